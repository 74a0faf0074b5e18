"""Wall time of the main job as a user starts it: `moe-lightning plan` with no arguments, a fresh process
each run (imports, the built-in default's search and its four baselines, the printed table), offline.
The target (issue 12) is under 1 s on the 2-core development machine; the exit code is 1 when the median
misses it.

    python benchmarks/plan_cli_time.py --runs 15 --out benchmarks/results/plan_cli_time.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402

TARGET_S = 1.0


def time_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2, help="runs not counted (the file cache)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.runs < 1:
        raise SystemExit("plan_cli_time: --runs must be at least 1")
    cmd = [sys.executable, "-m", "moe_lightning_cli.main", "plan"]
    for _ in range(args.warmup):
        time_once(cmd)
    walls = [time_once(cmd) for _ in range(args.runs)]
    med = statistics.median(walls)
    print(f"moe-lightning plan: median {med:.3f} s, min {min(walls):.3f}, max {max(walls):.3f} "
          f"over {len(walls)} runs (target < {TARGET_S:.1f} s)")
    write_result(args.out, "plan_cli_time.py", argv, what="wall seconds of `moe-lightning plan`, no arguments",
                 cpu_count=os.cpu_count(), python=sys.version.split()[0], runs=len(walls),
                 median_s=med, min_s=min(walls), max_s=max(walls), walls_s=walls, target_s=TARGET_S)
    return 0 if med < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
