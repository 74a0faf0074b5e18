"""Search time of `optimizer.search` (default mode, grid solver) per built-in model x hardware profile.

Writes benchmarks/results/search_time.csv (one row per pair: median / min / max wall seconds of the
whole `search()` call over --runs runs, the chosen policy or why nothing fits) and a JSON sidecar
search_time.json with the machine, the command, the date and a summary. The target (issue 3) is a
median under 2 s for every pair on the 2-core development machine; the exit code is 1 when a pair
misses it.

    python benchmarks/search_time.py                 # every built-in model x profile, 5 runs each
    python benchmarks/search_time.py --models mixtral-8x7b --profiles t4-s1 --runs 9
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hrm.atomic import atomic_write_text  # noqa: E402
from hrm.hardware import available_profiles, load_profile  # noqa: E402
from hrm.host import local_cpu_name  # noqa: E402
from hrm.hf_config import builtin_models, load_model  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from optimizer.search import search  # noqa: E402
from optimizer.space import SearchError  # noqa: E402

TARGET_S = 2.0
FIELDS = ("model", "hardware", "status", "median_s", "min_s", "max_s", "runs", "policy", "throughput_tok_s", "note")


def _versions() -> dict:
    import numpy
    import pulp
    return {"python": platform.python_version(), "numpy": numpy.__version__, "pulp": pulp.__version__}


def time_one(model: str, profile: str, workload: Workload, runs: int) -> dict:
    spec, hw = load_model(model), load_profile(profile)
    times, plan, error = [], None, ""
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            plan = search(spec, hw, workload)
        except SearchError as e:
            error = str(e)
        times.append(time.perf_counter() - t0)
    row = {"model": model, "hardware": profile, "status": "ok" if plan is not None else "infeasible",
           "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": runs,
           "policy": plan.policy.short() if plan is not None else "",
           "throughput_tok_s": plan.throughput_tok_s if plan is not None else "", "note": error}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: every built-in model")
    ap.add_argument("--profiles", nargs="*", default=None, help="default: every built-in hardware profile")
    ap.add_argument("--runs", type=int, default=5, help="runs per pair; the median is reported (default 5)")
    ap.add_argument("--prompt-len", type=float, default=77.0)
    ap.add_argument("--max-prompt-len", type=int, default=418)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "search_time.csv"))
    args = ap.parse_args(argv)

    models = args.models or builtin_models()
    profiles = args.profiles or available_profiles()
    workload = Workload(args.prompt_len, args.max_prompt_len, args.gen_len)
    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    for model in models:
        for profile in profiles:
            row = time_one(model, profile, workload, args.runs)
            rows.append(row)
            print(f"{row['median_s']:7.3f} s  {model:20s} {profile:10s} {row['status']:10s} {row['policy']}", flush=True)

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    out = Path(args.output)
    atomic_write_text(out, buf.getvalue())

    medians = [r["median_s"] for r in rows]
    slow = [f"{r['model']}/{r['hardware']}" for r in rows if r["median_s"] >= TARGET_S]
    slowest = max(rows, key=lambda r: r["median_s"])
    sidecar = {
        "benchmark": "optimizer.search default mode, grid solver: wall seconds of search() per model x profile",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpu": local_cpu_name(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), **_versions()},
        "workload": {"avg_prompt_len": workload.avg_prompt_len, "max_prompt_len": workload.max_prompt_len,
                     "gen_len": workload.gen_len, "padded": workload.padded},
        "runs_per_pair": args.runs,
        "target_median_s": TARGET_S,
        "summary": {"pairs": len(rows), "feasible": sum(r["status"] == "ok" for r in rows),
                    "max_median_s": max(medians), "mean_median_s": statistics.fmean(medians),
                    "slowest": f"{slowest['model']}/{slowest['hardware']}", "over_target": slow},
        "csv": out.name,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json').name}: max median {max(medians):.3f} s "
          f"({sidecar['summary']['slowest']}), {len(slow)} over {TARGET_S:g} s")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
