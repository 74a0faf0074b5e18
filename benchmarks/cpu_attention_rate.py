"""CPU decode attention kernels at the pipeline's shapes: ms per call and GB/s of KV read, per kernel, KV
format, batch and context, to choose runtime.cpu_attention.DECODE_KERNEL / QUANT_DECODE_KERNEL (and the
chunk size) by measurement.

    python benchmarks/cpu_attention_rate.py --out benchmarks/results/h200/cpu_attention_rate.json
    python benchmarks/cpu_attention_rate.py --quick          # a small grid (the 2-core dev machine)

Shapes as the runtime holds them: Mixtral's 32 query heads over 8 kv heads of 128 (--model for others), one
layer's K and V of `batch` sequences as views of the first `ctx` slots of a cache with `--headroom` more slots
(the generated tokens'), in page-locked host memory where CUDA is present; one call per layer and micro-batch.
Each kernel runs on the runtime's attention worker with its threads (all cores but
runtime.cpu_attention.HOST_CORES_RESERVED where a GPU is present; --threads sets them). GB/s counts the
bytes stored for the slots read (values and, for int8 and fp8, their fp32 scales), each read once;
`pct_of_dram_read` relates it to this process's own DRAM read rate (a sum over 1 GiB on the same threads)
and `pct_of_profile_dram` to the profile's. `max_abs_err` is the largest deviation of the kernel's output
from fp64 attention over the same stored values (the first sequences of the batch), in units of the output.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
import runtime.cpu_attention as ca  # noqa: E402
from runtime import cpu_attention_fused as fused  # noqa: E402
from hrm.formats import kv_format  # noqa: E402
from hrm.host import local_cpu_name  # noqa: E402
from runtime.host_memory import empty_host  # noqa: E402

FLOAT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def candidates(fmt: str, chunks) -> list[tuple[str, object]]:
    """(label, kernel(q, k, v, mask)) of every candidate for a cache format ("fused" takes the whole cache
    block, the others its first t slots)."""
    if fmt in FLOAT:
        out = [("sdpa", ca.decode_attention_sdpa), ("bmm", ca.decode_attention_bmm),
               ("bmm_bf16", ca.decode_attention_bmm_bf16)]
        out += [(f"chunked:{c}", lambda q, k, v, m, c=c: ca.decode_attention_chunked(q, k, v, m, c)) for c in chunks]
        out += [(f"chunked_bf16:{c}", lambda q, k, v, m, c=c: ca.decode_attention_chunked(q, k, v, m, c, torch.bfloat16))
                for c in chunks]
        out += [(f"sdpa:{c}", lambda q, k, v, m, c=c: ca.decode_attention_sdpa(q, k, v, m, c)) for c in chunks[-1:]]
        return out + [("fused", ca.KERNELS["fused"])] * ("fused" in ca.KERNELS)
    out = [(f"chunked:{c}", lambda q, k, v, m, c=c: ca.decode_attention_chunked(q, k, v, m, c)) for c in chunks]
    out += [(f"chunked_bf16:{c}", lambda q, k, v, m, c=c: ca.decode_attention_chunked(q, k, v, m, c, torch.bfloat16))
            for c in chunks]
    out += [(f"chunked_sdpa:{c}", lambda q, k, v, m, c=c: ca.decode_attention_chunked_sdpa(q, k, v, m, c))
            for c in sorted({chunks[min(1, len(chunks) - 1)], chunks[-1]})]
    return out + [("fused", ca.QUANT_KERNELS["fused"])] * ("fused" in ca.QUANT_KERNELS)


def make_cache(fmt: str, batch: int, n_kv: int, capacity: int, d: int, seed: int):
    """(k, v) of one layer as the runtime stores them: tensors in the compute dtype, or QuantKV; 64 sequences
    of normal values repeated over the batch (the kernels' time does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    shape = (batch, n_kv, capacity, d)

    rows = 64                                         # rows drawn at once, then repeated (memcpy speed:
    block = torch.randn((min(batch, rows),) + shape[1:], generator=g)   # normal_ over GBs takes minutes)

    def one():
        block.normal_(generator=g)
        if fmt in FLOAT:
            t = empty_host(shape, FLOAT[fmt], pin)
            for r in range(0, batch, rows):
                t[r:r + rows].copy_(block[:min(batch, r + rows) - r])
            return t
        f = kv_format(fmt)
        data = empty_host(shape, ca.STORAGE_DTYPES[fmt], pin)
        scale = empty_host(shape[:3], torch.float32, pin)
        q = ca.quantize_kv(block.to(torch.bfloat16), f)
        for r in range(0, batch, rows):
            n = min(batch, r + rows) - r
            data[r:r + n].copy_(q.data[:n])
            scale[r:r + n].copy_(q.scale[:n])
        return ca.QuantKV(data, scale)
    return one(), one()


def stored_bytes(k, t: int) -> float:
    """Bytes of K and V of one layer for the first t slots (values and scales)."""
    if isinstance(k, ca.QuantKV):
        per_slot = k.shape[0] * k.shape[1] * (k.shape[3] * k.data.element_size() + 4)
    else:
        per_slot = k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
    return 2.0 * per_slot * t


def reference(q, k, v, t: int, rows: int) -> torch.Tensor:
    """fp64 attention over the first `rows` sequences' stored values (dequantized exactly)."""
    if isinstance(k, ca.QuantKV):
        k, v = (x[:rows, :, :t].dequantize(torch.float64) for x in (k, v))
    else:
        k, v = k[:rows, :, :t].double(), v[:rows, :, :t].double()
    return ca.decode_attention_bmm(q[:rows].double(), k, v, torch.ones(rows, 1, 1, t, dtype=torch.bool))


def time_call(fn, repeats: int, min_s: float) -> list[float]:
    fn()                                                    # warm-up: workspaces, thread team
    times = []
    while len(times) < repeats or (sum(times) < min_s and len(times) < 4 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def dram_read_bytes_per_s(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    x = torch.empty(size_bytes // 4, dtype=torch.float32)
    x.fill_(1.0)
    return size_bytes / statistics.median(time_call(lambda: x.sum(), repeats, 0.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--batches", type=int, nargs="+", default=[200, 600, 1200, 1800])
    p.add_argument("--ctx", type=int, nargs="+", default=[256, 288])
    p.add_argument("--headroom", type=int, default=32, help="cache slots beyond the largest ctx (default 32)")
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "fp8"])
    p.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: the runtime's attention threads, all cores but "
                        f"{ca.HOST_CORES_RESERVED} where a GPU is present)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hardware", default="h200-measured", help="profile whose DRAM read rate the rates are related to")
    p.add_argument("--time-limit-s", type=float, default=None, help="start no new shape after this")
    p.add_argument("--kernels", nargs="+", default=None,
                   help="time only these kernels (labels as in the output, e.g. fused sdpa chunked:16)")
    p.add_argument("--quick", action="store_true", help="batches 16 48, ctx 64, chunks 8 16, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.ctx, args.chunks, args.repeats = [16, 48], [64], [8, 16], 2
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    spec = load_model(args.model)
    n_q, n_kv, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    hw = load_profile(args.hardware)
    profile_dram = hw.measured.cpu_dram_bytes_per_s if hw.measured and hw.measured.cpu_dram_bytes_per_s \
        else hw.cpu.mem_bytes_per_s
    threads = args.threads or ca.attention_threads(torch.cuda.is_available()) or torch.get_num_threads()
    worker = ca.AttentionWorker(threads)
    t_start = time.perf_counter()
    rows = []
    try:
        dram = worker.submit(dram_read_bytes_per_s).result()
        print(f"threads {threads}, DRAM read {dram / 1e9:.1f} GB/s (profile {args.hardware}: "
              f"{profile_dram / 1e9:.1f}); fused kernel {json.dumps(fused.settings())}", flush=True)
        capacity = max(args.ctx) + args.headroom
        for fmt in args.formats:
            for batch in args.batches:
                if args.time_limit_s and time.perf_counter() - t_start > args.time_limit_s:
                    print(f"time limit: stopped before {fmt} batch {batch}", flush=True)
                    break
                k, v = make_cache(fmt, batch, n_kv, capacity, d, seed=batch)
                q = torch.randn(batch, n_q, d, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
                for t in args.ctx:
                    mask = torch.ones(batch, 1, 1, t, dtype=torch.bool)
                    kt, vt = k[:, :, :t], v[:, :, :t]
                    ref = reference(q, k, v, t, rows=4)
                    nbytes = stored_bytes(k, t)
                    for label, kernel in candidates(fmt, args.chunks):
                        if args.kernels and label not in args.kernels:
                            continue
                        whole = label == "fused"              # reads the cache block in place, as the runtime
                        def call(kernel=kernel, kk=k if whole else kt, vv=v if whole else vt):
                            return kernel(q, kk, vv, mask)
                        out = worker.submit(call).result()
                        err = float((out[:4].double() - ref).abs().max())
                        times = worker.submit(time_call, call, args.repeats, 1.0).result()
                        s = statistics.median(times)
                        row = {"format": fmt, "kernel": label, "batch": batch, "ctx": t, "threads": threads,
                               "ms_per_call": s * 1e3, "ms_min": min(times) * 1e3, "calls": len(times),
                               "kv_bytes": nbytes, "gb_per_s": nbytes / s / 1e9,
                               "pct_of_dram_read": 100.0 * nbytes / s / dram,
                               "pct_of_profile_dram": 100.0 * nbytes / s / profile_dram, "max_abs_err": err}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                del k, v
    finally:
        worker.close()
    best = {}
    for fmt in args.formats:
        by_kernel: dict = {}
        for r in rows:
            if r["format"] == fmt:
                by_kernel.setdefault(r["kernel"], []).append(r["ms_per_call"])
        full = {k: sum(ms) for k, ms in by_kernel.items() if len(ms) == max(map(len, by_kernel.values()))}
        if full:
            name = min(full, key=full.get)
            best[fmt] = {"kernel": name, "total_ms_over_shapes": full[name],
                         "median_gb_per_s": statistics.median(r["gb_per_s"] for r in rows
                                                              if r["format"] == fmt and r["kernel"] == name)}
    print("best (least total time over the shapes):", json.dumps(best), flush=True)
    write_result(args.out, "benchmarks/cpu_attention_rate.py", argv, model=args.model, threads=threads,
                 dram_read_bytes_per_s=dram, profile=args.hardware, profile_dram_read_bytes_per_s=profile_dram,
                 cpu=local_cpu_name(), torch=torch.__version__, rows=rows, best=best, fused_settings=fused.settings(),
                 wall_s=time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
