"""What the cost model predicts, today, for every policy the project has committed: the plans of the
whole-model runs (benchmarks/results/whole_model/*/keep/*.plan.json, re-priced with the committed
h200-measured profile), the hand-set sweep policies (benchmarks/sweeps/*.json) and the default plan of
`moe-lightning plan`. tests/test_golden.py holds the model to predictions.json, so that a change meant to
reshape the code cannot move a number; a change meant to move them regenerates the file and says so:

    python tests/golden/predictions.py --write
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hrm.atomic import atomic_write_text  # noqa: E402
from hrm.estimate import estimate  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from optimizer.plan import Plan  # noqa: E402

GOLDEN = Path(__file__).with_name("predictions.json")
SWEEP_WORKLOAD = Workload(avg_prompt_len=256, max_prompt_len=256, gen_len=32)


def _numbers(est) -> dict:
    return {"tok_s": est.throughput_tok_s, "prefill_s": est.prefill_s, "decode_s": est.decode_s,
            "gpu_bytes": est.memory.gpu_bytes, "cpu_bytes": est.memory.cpu_bytes}


def predictions() -> dict[str, dict]:
    hw = load_profile("h200-measured")
    out = {}
    for path in sorted((ROOT / "benchmarks/results/whole_model").glob("*/keep*/**/*.plan.json")):
        plan = Plan.load(path)
        out[str(path.relative_to(ROOT))] = _numbers(estimate(plan.spec, hw, plan.workload, plan.policy))
    for path in sorted((ROOT / "benchmarks/sweeps").glob("*.json")):
        spec = load_model(path.stem.rsplit("-", 1)[0])
        for job in json.loads(path.read_text()):
            key = f"{path.relative_to(ROOT)}:{job['gpu_memory']}:{job['tag']}"
            out[key] = _numbers(estimate(spec, hw, SWEEP_WORKLOAD, Policy(**job["policy"])))
    out["default plan"] = _default_plan()
    return out


def _default_plan() -> dict:
    """`moe-lightning plan --json`, no other argument: the chosen policy and its prediction."""
    import contextlib
    import io

    from moe_lightning_cli.main import main as cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(["plan", "--json"])
    if rc:
        raise RuntimeError(f"moe-lightning plan exited {rc}")
    plan = Plan.from_dict(json.loads(buf.getvalue())["plan"])
    return {**_numbers(plan.estimate), "policy": plan.policy.short()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} (else print)")
    args = p.parse_args(argv)
    text = json.dumps(predictions(), indent=1, sort_keys=True) + "\n"
    if args.write:
        atomic_write_text(GOLDEN, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
