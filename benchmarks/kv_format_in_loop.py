"""The CPU attention's calls over each 8-bit KV cache inside the runtime's CGOPipe decode loop, over bf16's
calls at the same setting (runtime.probe.calibration.kv_format_time_in_pipeline at LOOP_KV_FORMAT_SETTING),
written into a copy of a measured profile as `cpu_attention_loop_time_of_compute_by_kv_format`: the one
figure of `moe-lightning profile --only cpu-attention` that an 8-bit plan's price needs, in ~1 minute
instead of ~5. Needs a CUDA GPU.

    python benchmarks/kv_format_in_loop.py --base hrm/hardware_profiles/h200-measured.toml \\
        -o /tmp/h200-measured.toml --out benchmarks/results/h200/kv_format_in_loop.json
"""
from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
from hrm.atomic import atomic_write_text, check_writable  # noqa: E402
from hrm.formats import SCALED_KV_FORMATS  # noqa: E402
from hrm.hardware import load_profile, parse_profile  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.profile_keys import replace_profile_keys  # noqa: E402
from runtime.probe import check_cpu_attention_base, read_profile_text  # noqa: E402
from runtime.probe.calibration import LOOP_KV_FORMAT_SETTING, attention_in_pipeline, kv_format_time_in_pipeline  # noqa: E402
from runtime.probe.profile_toml import _kt  # noqa: E402

KEY = "cpu_attention_loop_time_of_compute_by_kv_format"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="measured profile (name or path) whose other values are kept")
    p.add_argument("-o", "--output", required=True, metavar="NEW.toml")
    p.add_argument("--out", default=None, help="result JSON")
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--formats", nargs="+", default=list(SCALED_KV_FORMATS), choices=SCALED_KV_FORMATS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kv_format_in_loop: needs a CUDA GPU (the decode loop runs on it)")
    base = load_profile(args.base)
    text = read_profile_text(base.path)
    check_cpu_attention_base(text, base.path)
    check_writable(args.output)
    t0 = time.perf_counter()
    spec = load_model(args.model)
    bf16 = attention_in_pipeline(spec, **LOOP_KV_FORMAT_SETTING)
    ratios = kv_format_time_in_pipeline(spec, bf16, LOOP_KV_FORMAT_SETTING, args.formats)
    for name, r in ratios.items():
        print(f"{name}: {r:.3f} of bf16's in-loop call ({bf16['loop_call_s'] * 1e3:.2f} ms at "
              f"{LOOP_KV_FORMAT_SETTING})", flush=True)
    line = _kt(KEY, ratios)
    new = replace_profile_keys(text, "calibration", {KEY: line})
    parse_profile(tomllib.loads(new), Path(args.output).stem, args.output)        # it loads, before writing
    atomic_write_text(Path(args.output), new)
    print(f"wrote {args.output}: {base.path} with {line}", flush=True)
    write_result(args.out, "benchmarks/kv_format_in_loop.py", argv, model=args.model, base=base.path,
                 setting=LOOP_KV_FORMAT_SETTING, bf16_loop_call_s=bf16["loop_call_s"], time_of_compute=ratios,
                 wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
