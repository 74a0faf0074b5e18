"""Whole-model runs priced again: each run's measurement beside the prediction its plan carried when it ran
and the prediction of the cost model and profile as they are now (the runs stay as measured; only the
prediction is recomputed, for the same policy, model and workload).

    python benchmarks/reprice_whole_model.py benchmarks/results/whole_model/h200-2026-12-02-call* \\
        --hardware h200-measured --out benchmarks/results/whole_model/h200-2026-12-02-repriced.csv

Each folder holds `<run>.plan.json` and `<run>.measurement.json` under `keep*/` (benchmarks/whole_model.py --keep).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from hrm.atomic import atomic_write_text  # noqa: E402
from hrm.estimate import estimate  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from optimizer.plan import Plan  # noqa: E402

GiB = 2 ** 30


def _pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def rows_of(folder: Path, hw, use_measured: bool = True, efficiency_model: bool = True) -> list[dict]:
    """One row per run of `folder`: the measurement beside the plan's prediction then and the cost
    model's now (`use_measured` off: from the profile's unit-level rates and the efficiency model, or with
    `efficiency_model` off too, at their roofline alone)."""
    rows = []
    for meas_path in sorted(folder.glob("keep*/**/*.measurement.json")):   # keep/, keep/<step>/, keep-<env>/
        run = str(meas_path.relative_to(folder))[: -len(".measurement.json")]
        plan = Plan.load(folder / f"{run}.plan.json")
        meas = json.loads(meas_path.read_text())
        now = estimate(plan.spec, hw, plan.workload, plan.policy, use_measured=use_measured,
                       efficiency_model=efficiency_model)
        then = plan.estimate
        m_tok = meas["derived"]["tokens_per_s"]
        rows.append({
            "folder": folder.name, "run": run, "model": plan.spec.name, "policy": plan.policy.short(),
            "meas_tok_s": m_tok, "then_tok_s": then.throughput_tok_s, "now_tok_s": now.throughput_tok_s,
            "then_err_pct": _pct(then.throughput_tok_s, m_tok), "now_err_pct": _pct(now.throughput_tok_s, m_tok),
            "meas_prefill_s": meas["prefill_s"], "now_prefill_s": now.prefill_s,
            "meas_decode_s": meas["decode_s"], "now_decode_s": now.decode_s,
            "meas_gpu_gib": meas["gpu_peak_bytes"] / GiB, "now_gpu_gib": now.memory.gpu_bytes / GiB,
            "meas_host_gib": meas["cpu_peak_bytes"] / GiB, "now_host_gib": now.memory.cpu_bytes / GiB,
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--hardware", default="h200-measured")
    p.add_argument("--out", type=Path, default=None, help="CSV of every run (default: print only)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    hw = load_profile(args.hardware)
    rows = [r for folder in args.folders for r in rows_of(folder, hw)]
    if not rows:
        raise SystemExit("reprice_whole_model: no keep*/**/*.measurement.json under the folders given")
    df = pd.DataFrame(rows)
    if args.json:
        print(df.to_json(orient="records", indent=1))
    else:
        cols = ["folder", "run", "policy", "meas_tok_s", "then_tok_s", "then_err_pct", "now_tok_s", "now_err_pct",
                "meas_prefill_s", "now_prefill_s", "meas_decode_s", "now_decode_s", "meas_gpu_gib", "now_gpu_gib"]
        print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.1f}"))
        for model, g in df.groupby("model"):
            print(f"{model}: {len(g)} runs, median |error| then {statistics.median(g.then_err_pct.abs()):.1f}%, "
                  f"now {statistics.median(g.now_err_pct.abs()):.1f}%")
    if args.out:
        buf = io.StringIO()
        df.to_csv(buf, index=False)
        atomic_write_text(args.out, buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
