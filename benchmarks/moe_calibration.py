"""The profile's MoE calibration (`gpu_moe_tflops`: runtime.moe.moe's routed-expert rate by tokens per expert,
every expert resident) measured again, once with the grouped path's one-pass activation kernel turned off
(MOE_LIGHTNING_SWIGLU_KERNEL=0) and once on: what the kernel changes, and the curve a profile should hold.

    python benchmarks/moe_calibration.py --out benchmarks/results/whole_model/h200-run/moe_calibration.json
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from runtime.probe.calibration import MOE_MODELS, MOE_TOKENS_PER_EXPERT, gpu_moe_flops_per_s, moe_shape  # noqa: E402

SETTINGS = {"three-kernel": "0", "one-pass": "1"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MOE_MODELS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("moe_calibration: needs a CUDA GPU")
    specs = [load_model(m) for m in args.models]
    rows, before = [], os.environ.get("MOE_LIGHTNING_SWIGLU_KERNEL")
    for spec in specs:
        for setting, value in SETTINGS.items():
            os.environ["MOE_LIGHTNING_SWIGLU_KERNEL"] = value
            tflops = [r / 1e12 for r in gpu_moe_flops_per_s(spec)]
            rows.append({"model": spec.name, "shape": moe_shape(spec), "setting": setting,
                         "tokens_per_expert": list(MOE_TOKENS_PER_EXPERT), "tflops": tflops})
            print(f"{spec.name:16s} {setting:13s} " + " ".join(f"{t:6.1f}" for t in tflops), flush=True)
    if before is None:
        os.environ.pop("MOE_LIGHTNING_SWIGLU_KERNEL")
    else:
        os.environ["MOE_LIGHTNING_SWIGLU_KERNEL"] = before
    write_result(args.out, "benchmarks/moe_calibration.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
