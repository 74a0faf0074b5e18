"""CPU decode attention inside the whole-model pipeline: GB/s of KV read, from the runs' own stage timers.

For every kept run (keep*/**/*.measurement.json beside its .plan.json) that ran attention on the CPU: the
KV bytes its decode attention read (the cost model's `hrm.ops.attention` at each decode step's context, the
plan's model in its KV format, over the plan's N sequences and all layers) divided by the seconds the
runtime's `cpu_attention` stage timer summed in decode. Beside it the profile's DRAM read rate (the plan's
hardware, `cpu.mem_bytes_per_s`) and the share of it the attention reached, and the attention's time per
layer-step measured and predicted (the plan's estimate at the mean decode context).

    python benchmarks/attention_in_pipeline.py benchmarks/results/whole_model/h200-2026-12-04-call4{1,2} \
        --out benchmarks/results/whole_model/attention_in_pipeline-2026-12-04.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
from hrm import ops  # noqa: E402
from optimizer.plan import Plan  # noqa: E402


def decode_kv_bytes(plan: Plan, decode_steps: int) -> float:
    """KV bytes the decode attention of all N sequences reads (and writes: the new entry) over all layers and
    `decode_steps` steps; step i attends to the prompt and the i tokens decoded before it."""
    spec, past = plan.spec, plan.workload.avg_prompt_len + np.arange(decode_steps)
    return float(np.sum(ops.attention(spec, plan.policy.batch_size, 1, past).kv_bytes)) * spec.num_hidden_layers


def row_of(folder: Path, meas_path: Path) -> dict | None:
    run = str(meas_path.relative_to(folder))[: -len(".measurement.json")]
    plan = Plan.load(folder / f"{run}.plan.json")
    if plan.policy.attention_on_gpu:
        return None
    meas = json.loads(meas_path.read_text())
    stage = [s for s in meas["stages"] if s["phase"] == "decode" and s["name"] == "cpu_attention"]
    if not stage:
        return None
    layers = plan.spec.num_hidden_layers
    layer_steps = int(meas["decode_layer_steps"])
    attention_s = float(stage[0]["total_s"])
    kv_bytes = decode_kv_bytes(plan, layer_steps // layers)
    dram = float(plan.hardware.cpu.mem_bytes_per_s)
    gb_per_s = kv_bytes / attention_s / 1e9
    return {"folder": folder.name, "run": run, "policy": plan.policy.short(),
            "kv_format": plan.spec.dtypes.kv_format or plan.spec.dtypes.name,
            "expert_format": plan.spec.dtypes.expert_format or plan.spec.dtypes.name,
            "calls": int(stage[0]["count"]), "layer_steps": layer_steps,
            "meas_attention_ms_per_layer_step": attention_s / layer_steps * 1e3,
            "pred_attention_ms_per_layer_step": plan.estimate.decode_layer["cpu"] * 1e3,
            "kv_gb_per_layer_step": kv_bytes / layer_steps / 1e9,
            "kv_read_gb_per_s": gb_per_s, "profile_dram_read_gb_per_s": dram / 1e9,
            "share_of_dram_read": gb_per_s / (dram / 1e9),
            "meas_tok_s": meas["derived"]["tokens_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="run folders holding keep/*.plan.json and *.measurement.json")
    p.add_argument("--out", type=Path, default=None, help="JSON of every row (default: print only)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            raise SystemExit(f"attention_in_pipeline: {folder} is not a folder")
    rows = [r for folder in args.folders for m in sorted(folder.glob("keep*/**/*.measurement.json"))
            if (r := row_of(folder, m)) is not None]
    if not rows:
        raise SystemExit("attention_in_pipeline: no run with CPU attention under the folders given")
    df = pd.DataFrame(rows)
    if args.json:
        print(df.to_json(orient="records", indent=1))
    else:
        cols = ["folder", "policy", "kv_format", "expert_format", "meas_attention_ms_per_layer_step",
                "pred_attention_ms_per_layer_step", "kv_gb_per_layer_step", "kv_read_gb_per_s", "share_of_dram_read"]
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        write_result(args.out, "benchmarks/attention_in_pipeline.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
