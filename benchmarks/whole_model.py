"""Whole-model validation: the optimizer's plan (and any extra policies) on the full-depth model, each run
in its own process by `moe-lightning run`, predicted against measured for time and memory.

    python benchmarks/whole_model.py --model mixtral-8x7b --hardware h200-measured --gpu-memory 24GB 48GB \\
        --prompt-len 256 --gen-len 32 [--policies sweep.json] [--out benchmarks/results/whole_model/h200-DATE.csv]

One row per run, appended as it finishes (a failed run is a row with completed false and its error line):
the columns of COLUMNS. The host budget is the machine's own (what it has available when the profile is
this machine's), unless --cpu-memory is given. --policies: a JSON list of {"gpu_memory": "24GB", "tag":
"...", "policy": {Policy fields}}. Rows are appended to the CSV (written through a temporary file each time);
a JSON sidecar beside it holds the command, machine and date.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hrm.atomic import atomic_write_text  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from optimizer.plan import build_plan  # noqa: E402
from optimizer.search import make_problem, search  # noqa: E402

COLUMNS = ("date", "model", "num_layers", "model_layers", "gpu_budget_bytes", "host_budget_bytes", "tag", "policy",
           "completed", "error", "pred_tok_s", "meas_tok_s", "pred_prefill_s", "meas_prefill_s", "pred_decode_s",
           "meas_decode_s", "pred_gpu_peak_bytes", "meas_gpu_peak_bytes", "pred_host_peak_bytes",
           "meas_host_peak_bytes", "pred_pinned_bytes", "meas_pinned_bytes", "meas_gpu_allocated_peak_bytes",
           "setup_s", "load_s", "reserve_s", "wall_s", "plan_file", "expert_dtype", "kv_dtype")


SETUP_S = 60.0
"""A job's time beyond its predicted prefill and decode, before one has run (H200 2026-12-02: 45-55 s to
start the process, pin ~120 GB and warm up)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--expert-dtype", default=None, choices=("bf16", "int8", "int4"),
                   help="routed experts stored in this format (hrm.formats), every plan made for it")
    p.add_argument("--kv-dtype", default=None, choices=("bf16", "int8", "fp8"),
                   help="KV cache stored in this format (hrm.formats), every plan made for it")
    p.add_argument("--hardware", default="h200-measured")
    p.add_argument("--gpu-memory", nargs="+", default=["24GB"], help="GPU budgets (the process's totals)")
    p.add_argument("--cpu-memory", default=None, help="host budget (default: what this machine has available)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--policies", default=None, help="JSON file of extra policies (see the module doc)")
    p.add_argument("--no-chosen", action="store_true", help="run only --policies, not the optimizer's plans")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", default=None)
    p.add_argument("--keep", default=None, help="folder for each run's plan and measurement JSON")
    p.add_argument("--jobs", default=None, metavar="A:B",
                   help="run only jobs A..B-1 (the chosen plans first, then --policies in order), to split a "
                        "sweep over calls")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="start no job that would end after this many seconds from the script's start (a job is "
                        "taken to last as long as the longest so far, at least its predicted time plus SETUP_S)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each job's prediction and memory against its budgets; run nothing")
    return p.parse_args(argv)


def _row_of(date, spec, budgets, tag, plan, meas, error, wall_s, plan_file) -> dict:
    est = plan.estimate
    row = {"date": date, "model": spec.name, "num_layers": spec.num_hidden_layers,
           "model_layers": spec.num_hidden_layers, "gpu_budget_bytes": budgets.gpu_total_bytes,
           "host_budget_bytes": budgets.cpu_total_bytes, "tag": tag, "policy": plan.policy.short(),
           "completed": meas is not None, "error": error or "",
           "pred_tok_s": est.throughput_tok_s, "pred_prefill_s": est.prefill_s, "pred_decode_s": est.decode_s,
           "pred_gpu_peak_bytes": est.memory.gpu_bytes, "pred_host_peak_bytes": est.memory.cpu_bytes,
           "pred_pinned_bytes": est.memory.pinned_bytes, "wall_s": wall_s, "plan_file": plan_file,
           # the runtime keeps the KV cache, and experts not quantized, in the compute dtype
           "expert_dtype": spec.dtypes.expert_format or spec.dtypes.name, "kv_dtype": spec.dtypes.kv_format or spec.dtypes.name}
    if meas is not None:
        d = meas["derived"]
        row.update(meas_tok_s=d["tokens_per_s"], meas_prefill_s=meas["prefill_s"], meas_decode_s=meas["decode_s"],
                   meas_gpu_peak_bytes=meas["gpu_peak_bytes"], meas_host_peak_bytes=meas["cpu_peak_bytes"],
                   meas_pinned_bytes=max(p["pinned_bytes"] for p in meas["memory_phases"]),
                   meas_gpu_allocated_peak_bytes=max(p["gpu_allocated_peak_bytes"] for p in meas["memory_phases"]),
                   meas_gpu_reserved_peak_bytes=max(p["gpu_reserved_peak_bytes"] for p in meas["memory_phases"]),
                   allocator=meas.get("allocator", ""), setup_s=meas["setup_s"],
                   **{f"{ph}_s": sum(p.get("wall_s", 0.0) for p in meas["memory_phases"] if p["phase"] == ph)
                      for ph in ("load", "reserve")})
    return row


def _error_line(done: subprocess.CompletedProcess) -> str:
    if done.returncode < 0:
        return f"killed by signal {-done.returncode}" + (" (the OOM killer's)" if done.returncode == -9 else "")
    lines = [ln for ln in (done.stderr or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit status {done.returncode}"


def run_one(plan, keep: Path, name: str, timeout: float):
    """(measurement dict or None, error line, wall seconds): `moe-lightning run --plan` in its own process."""
    plan_path, meas_path = keep / f"{name}.plan.json", keep / f"{name}.measurement.json"
    plan.save(plan_path)
    cmd = [sys.executable, "-m", "moe_lightning_cli.main", "run", "--plan", str(plan_path), "--json",
           "-o", str(meas_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
               PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if done.returncode != 0 or not meas_path.is_file():
        return None, _error_line(done), wall
    return json.loads(meas_path.read_text()), "", wall


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def main(argv=None) -> int:
    args = parse_args(argv)
    spec, hw = load_model(args.model), load_profile(args.hardware)
    if args.expert_dtype:
        spec = spec.with_expert_format(args.expert_dtype)
    if args.kv_dtype:
        spec = spec.with_kv_format(args.kv_dtype)
    workload = Workload.uniform(args.prompt_len, args.gen_len)
    date = _dt.date.today().isoformat()
    out = Path(args.out or ROOT / "benchmarks" / "results" / "whole_model" / f"{hw.name}-{date}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="whole_model_"))
    keep.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(out.open())) if out.is_file() else []
    jobs = []
    if not args.no_chosen:
        for g in args.gpu_memory:
            plan = search(spec, hw, workload, gpu_memory=g, cpu_memory=args.cpu_memory)
            jobs.append(("chosen", g, plan))
    for item in json.loads(Path(args.policies).read_text()) if args.policies else []:
        problem = make_problem(spec, hw, workload, gpu_memory=item["gpu_memory"], cpu_memory=args.cpu_memory)
        plan = build_plan(problem, Policy(**item["policy"]), budgets=problem.budgets, solver="given", mode="default",
                          search_time_s=0.0)
        jobs.append((item.get("tag", "policy"), item["gpu_memory"], plan))
    first, stop = (int(x) for x in args.jobs.split(":")) if args.jobs else (0, len(jobs))
    started, longest = time.perf_counter(), 0.0
    for i, (tag, g, plan) in enumerate(jobs):
        if not first <= i < stop:
            continue
        left = None if args.time_limit_s is None else args.time_limit_s - (time.perf_counter() - started)
        expected = max(longest, plan.estimate.prefill_s + plan.estimate.decode_s + SETUP_S)
        if left is not None and not args.dry_run and left < expected:
            print(f"[{i + 1}/{len(jobs)}] not started: {left:.0f} s left of --time-limit-s, a job takes "
                  f"~{expected:.0f} s; run the rest with --jobs {i}:{stop}", flush=True)
            break
        fmt = f"-{spec.dtypes.expert_format}" if spec.dtypes.expert_format else ""
        name = f"{spec.name}{fmt}-{g}-{i}-{tag}".replace(":", "_")
        est, b = plan.estimate, plan.budgets
        print(f"[{i + 1}/{len(jobs)}] {g} {tag}: {plan.policy.short()} predicted {est.throughput_tok_s:,.1f} "
              f"tok/s, GPU {est.memory.gpu_bytes / 2**30:.2f} of {b.gpu_bytes / 2**30:.2f} GiB, host "
              f"{est.memory.cpu_bytes / 2**30:.2f} of {b.cpu_bytes / 2**30:.2f} GiB"
              + ("" if plan.memory.within_budgets else "  EXCEEDS ITS BUDGETS"), flush=True)
        if args.dry_run:
            continue
        meas, error, wall = run_one(plan, keep, name, args.timeout if left is None else min(args.timeout, left))
        longest = max(longest, wall)
        rows.append(_row_of(date, spec, plan.budgets, tag, plan, meas, error, wall, name))
        _write_csv(out, rows)
        print(f"    {'measured %.1f tok/s, GPU %.2f GiB, host %.2f GiB' % (meas['derived']['tokens_per_s'], meas['gpu_peak_bytes'] / 2**30, meas['cpu_peak_bytes'] / 2**30) if meas else 'FAILED ' + error}"
              f" ({wall:.0f} s)", flush=True)
    if args.dry_run:
        return 0
    meta = {"command": " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:])),
            "date": date, "host": platform.node(), "hardware_profile": hw.name,
            "runs": len(jobs),
            # the environment the runs inherit that changes how they allocate (PyTorch's caching allocator)
            "env": {k: v for k, v in os.environ.items() if k.startswith("PYTORCH_CUDA_ALLOC")}}
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
