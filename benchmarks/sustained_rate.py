"""Does the GPU keep its rate over a whole prefill? The profile times each kernel for well under a second,
after a few warm-up calls; a whole-model prefill runs GEMMs back to back for 15-30 s. If the GPU's clocks
fall under sustained load (power or thermal limits), the short probe over-prices every long phase.

For each model's MoE layer (runtime.moe.moe, a 4,096-token chunk, every expert resident) and for a plain
bf16 GEMM, this runs the kernel back to back for `--seconds` and reports its rate in each window of
`--window-s`, beside the SM clock, power and throttle reasons nvidia-smi samples meanwhile.

    python benchmarks/sustained_rate.py --out benchmarks/results/sustained_rate-h200.json
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moe_kernels import one_layer  # noqa: E402
from result_file import write_result  # noqa: E402
from hrm import ops  # noqa: E402
from runtime import moe  # noqa: E402

SMI_FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def windows(step, flops_per_call: float, seconds: float, window_s: float, first_s: float = 1.0,
            first_window_s: float = 0.05) -> list[dict]:
    """Call `step` back to back for `seconds`; per window: its start (s from the first call), the calls
    it completed and their TFLOP/s (synchronised at each window's end). Windows are `first_window_s` long
    for the first `first_s` (what a probe of a few tens of milliseconds sees), then `window_s`."""
    out, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0, calls = time.perf_counter(), 0
        span = first_window_s if t0 - start < first_s else window_s
        while time.perf_counter() - t0 < span:
            step()
            calls += 1
            if calls % 2 == 0:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out.append({"t_s": round(t0 - start, 3), "calls": calls, "tflops": flops_per_call * calls / dt / 1e12})
    return out


def sampler(path: Path):
    """nvidia-smi sampling SMI_FIELDS every 200 ms into `path`, or None where it is missing."""
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader", "-lms", "200"],
                            stdout=path.open("w"), stderr=subprocess.DEVNULL)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--gemm", type=int, default=8192, help="the plain GEMM's M = N = K")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--window-s", type=float, default=1.0)
    p.add_argument("--idle-s", type=float, default=10.0, help="idle between kernels, to let the clocks recover")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sustained_rate: needs CUDA")
    smi_path = Path(args.out).with_suffix(".smi.csv")
    smi = sampler(smi_path)
    began = time.time()
    runs = []
    try:
        for name in args.models:
            spec, layer, table, h = one_layer(name, args.tokens, 1.0)
            flops = float(ops.routed_experts(spec, args.tokens).flops)
            for _ in range(3):
                moe.moe(h, layer, table, spec, False)
            time.sleep(args.idle_s)
            t = time.time() - began
            runs.append({"kernel": f"{name} MoE layer, {args.tokens} tokens", "began_s": round(t, 2),
                         "windows": windows(lambda: moe.moe(h, layer, table, spec, False), flops,
                                            args.seconds, args.window_s)})
        n = args.gemm
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        time.sleep(args.idle_s)
        runs.append({"kernel": f"bf16 GEMM {n}^3", "began_s": round(time.time() - began, 2),
                     "windows": windows(lambda: a @ b, 2.0 * n ** 3, args.seconds, args.window_s)})
    finally:
        if smi is not None:
            smi.terminate()
            smi.wait()
    for r in runs:
        w = r["windows"]
        first, last = w[0]["tflops"], sorted(x["tflops"] for x in w[-5:])[len(w[-5:]) // 2]
        r["first_window_tflops"], r["last_windows_median_tflops"] = first, last
        print(f"{r['kernel']}: {first:.0f} TFLOP/s in the first 50 ms, {last:.0f} over the last 5 one-second "
              f"windows ({last / first - 1:+.1%})", flush=True)
    write_result(args.out, "sustained_rate.py", argv, began_unix_s=began,
                 smi_fields=SMI_FIELDS, smi_file=smi_path.name if smi else None, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
