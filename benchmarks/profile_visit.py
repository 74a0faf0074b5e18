"""Where a decode visit's fixed cost goes: the decode-visit probe's setting (runtime.probe.visit_probe),
once as the probe measures it and once under torch.profiler with Python stacks, summarised per visit.

The probe prices a schedule's fixed cost per (micro-batch, layer) visit from a loop whose compute and
transfers vanish. Where that loop waits (on the attention worker, on an event, on the device), runs with
real work may hide the wait behind the GPU's; this splits the visit into host work and waits so that the
two can be told apart.

    PYTHONPATH=. python benchmarks/profile_visit.py --schedules s4,cgopipe --out $OUT/visit_profile.json

Per schedule it prints and writes: the visit in ms as the probe measures it (profiler off), the visit
under the profiler, and per visit the ms and calls of the main thread's waits (futures, event and stream
synchronisation, CUDA runtime calls) and its busiest operations. Python tracing slows the loop, so read
the profiled numbers as shares of the profiled visit, not as absolute costs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hrm.atomic import atomic_write_text  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402

# what counts as the main thread waiting: a label, and substrings that name the profiler event
WAITS = (("future result", ("_base.py", "): result")), ("python synchronize", ("): synchronize",)),
         ("cudaEventSynchronize", ("cudaEventSynchronize",)), ("cudaStreamSynchronize", ("cudaStreamSynchronize",)),
         ("cudaDeviceSynchronize", ("cudaDeviceSynchronize",)), ("cudaStreamWaitEvent", ("cudaStreamWaitEvent",)),
         ("cudaMemcpyAsync", ("cudaMemcpyAsync",)), ("cudaLaunchKernel", ("cudaLaunchKernel",)),
         ("aten::_local_scalar_dense (item)", ("aten::_local_scalar_dense",)))


def _wait_key(name: str) -> str | None:
    return next((key for key, parts in WAITS if all(p in name for p in parts)), None)


def summarise(events, visits: int, top: int = 15) -> dict:
    """Per visit: the main thread's waits and its busiest operations (self time), from profiler events.
    The main thread is the one that ran the most aten operations."""
    aten = defaultdict(int)
    for e in events:
        if e.name.startswith("aten::"):
            aten[e.thread] += 1
    main = max(aten, key=aten.get) if aten else None
    waits = defaultdict(lambda: [0.0, 0])
    busiest = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.thread != main:
            continue
        key = _wait_key(e.name)
        if key is not None:
            waits[key][0] += e.cpu_time_total / 1e3
            waits[key][1] += 1
        busiest[e.name][0] += e.self_cpu_time_total / 1e3
        busiest[e.name][1] += 1
    per_visit = {k: {"ms": v[0] / visits, "calls": v[1] / visits} for k, v in sorted(waits.items())}
    ranked = sorted(busiest.items(), key=lambda kv: -kv[1][0])[:top]
    return {"main_thread_waits_per_visit": per_visit,
            "main_thread_busiest_self_ms_per_visit": [{"name": n[:160], "ms": v[0] / visits, "calls": v[1] / visits}
                                                      for n, v in ranked]}


def profile_schedule(spec, schedule: str, visits: int, micro_batches: int, micro_batch_size: int,
                     layers: int = 1, trace: Path | None = None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from runtime.engine import Engine
    from runtime.probe import visit_probe

    one, policy, prompts, steps = visit_probe(spec, schedule, visits, micro_batches, micro_batch_size, layers)
    n_visits = steps * micro_batches * one.num_hidden_layers
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with Engine(one, policy, seed=0, progress=False, record=True) as eng:
        eng.generate(prompts, 3)                                           # warm-up
        plain = [eng.generate(prompts, steps + 1)[1] for _ in range(2)]    # the first may carry one-off costs
        with profile(activities=activities, with_stack=True) as prof:
            _, traced = eng.generate(prompts, steps + 1)
    if trace is not None:
        raw = trace.with_suffix(".tmp.json")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f_in, gzip.open(trace, "wb") as f_out:
            f_out.write(f_in.read())
        raw.unlink()
    out = {"schedule": schedule, "layers": one.num_hidden_layers, "policy": policy.short(), "visits": n_visits,
           "visit_ms": min(m.decode_s for m in plain) / n_visits * 1e3,
           "visit_ms_by_pass": [m.decode_s / n_visits * 1e3 for m in plain],
           "profiled_visit_ms": traced.decode_s / n_visits * 1e3}
    out.update(summarise(prof.events(), n_visits))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--schedules", default="cgopipe,s3,s4,blocking")
    ap.add_argument("--visits", type=int, default=128)
    ap.add_argument("--micro-batches", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--layers", default="1", help="comma-separated decoder-layer counts of the probe's model")
    ap.add_argument("--out", type=Path, required=True, help="JSON; gzipped chrome traces are written beside it")
    args = ap.parse_args(argv)
    from hrm.schedules import SCHEDULES
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        print(f"error: unknown schedule {bad[0]!r} (one of {', '.join(SCHEDULES)})", file=sys.stderr)
        return 2
    try:
        layer_counts = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        layer_counts = []
    if not layer_counts or min(layer_counts) < 1:
        print(f"error: --layers wants positive integers, got {args.layers!r}", file=sys.stderr)
        return 2
    spec = load_model(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch
    results = []
    meta = {"command": " ".join(["python", "benchmarks/profile_visit.py"] + list(sys.argv[1:] if argv is None else argv)),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": platform.node(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": spec.name,
            "micro_batches": args.micro_batches, "micro_batch_size": args.micro_batch_size, "results": results}
    for layers in layer_counts:
        for schedule in schedules:
            trace = args.out.with_name(f"{args.out.stem}_{schedule}_{layers}l.trace.json.gz")
            r = profile_schedule(spec, schedule, args.visits, args.micro_batches, args.micro_batch_size, layers, trace)
            results.append(r)
            waits = ", ".join(f"{k} {v['ms']:.3f} ms ({v['calls']:.1f})"
                              for k, v in r["main_thread_waits_per_visit"].items())
            passes = " / ".join(f"{v:.3f}" for v in r["visit_ms_by_pass"])
            print(f"{schedule:9s} {layers} layer(s): visit {passes} ms by pass (profiled {r['profiled_visit_ms']:.3f});"
                  f" per visit: {waits}", flush=True)
            atomic_write_text(args.out, json.dumps(meta, indent=2))    # after each: a cut-off run keeps what ran
    return 0


if __name__ == "__main__":
    sys.exit(main())
