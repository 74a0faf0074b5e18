"""How fast this machine page-locks fresh host memory: cudaHostRegister on untouched pages (the driver faults
them in on one thread) against the same after torch's parallel fill has touched them (what
`runtime.host_memory.empty_host` does for large buffers). Whole-model runs pin ~120 GB, so this rate sets
their set-up time.

    python benchmarks/pin_rate.py --gib 16 --rounds 2 --out benchmarks/results/pin_rate-h200.json

Each round does both ways in turn on a fresh buffer (freed after), so the order's effect shows.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402


def _pin_once(nbytes: int, touch: bool) -> dict:
    cudart = torch.cuda.cudart()
    t0 = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if touch:
        buf.zero_()
    t1 = time.perf_counter()
    err = int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0))
    t2 = time.perf_counter()
    if err:
        raise SystemExit(f"pin_rate: cudaHostRegister of {nbytes / 2**30:.1f} GiB failed with CUDA error {err}")
    cudart.cudaHostUnregister(buf.data_ptr())
    del buf
    total = t2 - t0
    return {"way": "touch_then_register" if touch else "register_untouched", "bytes": nbytes,
            "touch_s": t1 - t0, "register_s": t2 - t1, "total_s": total, "gb_per_s": nbytes / total / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=16.0, help="buffer size per try (GiB)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("pin_rate: needs CUDA (it measures cudaHostRegister)")
    torch.cuda.init()
    nbytes = int(args.gib * 2**30)
    tries = []
    for _ in range(args.rounds):
        for touch in (False, True):
            r = _pin_once(nbytes, touch)
            tries.append(r)
            print(f"{r['way']:>20}: {r['total_s']:6.2f} s ({r['touch_s']:.2f} touch + {r['register_s']:.2f} "
                  f"register), {r['gb_per_s']:.2f} GB/s", flush=True)
    write_result(args.out, "pin_rate.py", argv, threads=torch.get_num_threads(), tries=tries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
