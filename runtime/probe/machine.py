"""Micro-benchmarks of the machine: GPU GEMM and HBM, the CPU-GPU link, CPU DRAM, matmul and the decode-
attention kernel. SI units (bytes, bytes/s, FLOP/s, seconds); a copy counts read + write bytes, a transfer
the bytes moved once, duplex both directions at once, CPU attention the K and V bytes the kernel reads.
"""
from __future__ import annotations

import inspect
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from hrm.host import local_cpu_name

from hrm.units import KiB, MiB

from .base import SUSTAIN_S, _fill_random, _median_cpu_s, _median_cuda_s


# [tokens x hidden] x [hidden x ffn]: decode (1..64 tokens per expert GEMM) to prefill (4096)
GEMM_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


GEMM_TOKENS_QUICK = (1, 16, 256, 4096)


LINK_SIZES = (256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1024 * MiB)


LINK_SIZES_QUICK = (256 * KiB, 4 * MiB, 64 * MiB)


# (batch, context) of one decode-attention call on the CPU
ATTENTION_SHAPES = ((16, 512), (64, 1024), (128, 2048))


ATTENTION_SHAPES_QUICK = ((4, 128),)


AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def gpu_gemm_flops_per_s(tokens: Sequence[int] = GEMM_TOKENS, hidden_size: int = 4096, ffn_size: int = 14336,
                   dtype: torch.dtype = torch.bfloat16, repeats: int = 10, device: str = "cuda") -> list[float]:
    """FLOP/s of [tokens x hidden] x [hidden x ffn] (an expert's up projection) for each token count.

    The weight is laid out [ffn, hidden] as the runtime stores it; x @ w.T is what F.linear computes."""
    w = _fill_random(torch.empty(ffn_size, hidden_size, dtype=dtype, device=device), 1)   # [ffn, hidden]
    x_all = _fill_random(torch.empty(max(tokens), hidden_size, dtype=dtype, device=device), 2)
    rates = []
    for t in tokens:
        x = x_all[:t]                                                   # [tokens, hidden]
        out = torch.empty(t, ffn_size, dtype=dtype, device=device)     # [tokens, ffn]
        s = _median_cuda_s(lambda: torch.matmul(x, w.t(), out=out), repeats, sustain_s=SUSTAIN_S)
        rates.append(2.0 * t * hidden_size * ffn_size / s)
    return rates


def gpu_square_gemm_flops_per_s(n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                          device: str = "cuda") -> float:
    """FLOP/s of an n x n x n GEMM (the dense peak; fp32 uses torch's current TF32 setting)."""
    a = _fill_random(torch.empty(n, n, dtype=dtype, device=device), 3)
    b = _fill_random(torch.empty(n, n, dtype=dtype, device=device), 4)
    out = torch.empty(n, n, dtype=dtype, device=device)
    s = _median_cuda_s(lambda: torch.matmul(a, b, out=out), repeats, sustain_s=SUSTAIN_S)
    return 2.0 * n ** 3 / s


def gpu_hbm_bytes_per_s(size_bytes: int = 1024 * MiB, repeats: int = 10, device: str = "cuda") -> float:
    """Device-to-device copy rate, counting the bytes read plus the bytes written."""
    src = _fill_random(torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device), 5)
    dst = torch.empty_like(src)
    s = _median_cuda_s(lambda: dst.copy_(src), repeats)
    return 2.0 * size_bytes / s


def _pinned(nbytes: int) -> torch.Tensor:
    """Page-locked host bytes, pinned the way the runtime pins its weight store."""
    from ..host_memory import empty_host
    return empty_host((nbytes,), torch.uint8, pin=True)


def link_bytes_per_s(sizes: Sequence[int] = LINK_SIZES, repeats: int = 8,
                     device: str = "cuda") -> tuple[list[float], list[float]]:
    """Pinned H2D and D2H bytes/s for each transfer size (one buffer of the largest size, pinned once)."""
    top = max(sizes)
    dev = _fill_random(torch.empty(top // 2, dtype=torch.bfloat16, device=device), 6).view(torch.uint8)
    host = _pinned(top)
    host.copy_(dev)                                                     # random, non-zero host data
    dev_in = torch.empty(top, dtype=torch.uint8, device=device)
    host_out = _pinned(top)
    h2d, d2h = [], []
    for n in sizes:
        h2d.append(n / _median_cuda_s(lambda: dev_in[:n].copy_(host[:n], non_blocking=True), repeats))
        d2h.append(n / _median_cuda_s(lambda: host_out[:n].copy_(dev[:n], non_blocking=True), repeats))
    return h2d, d2h


def peer_bytes_per_s(size_bytes: int = 256 * MiB, repeats: int = 5) -> float:
    """Bytes/s of a copy from GPU 0 to GPU 1 (NVLink, or PCIe peer to peer where the GPUs allow it, else
    through the host): the rate tensor-parallel all-reduces move their partial sums at."""
    src = _fill_random(torch.empty(size_bytes // 2, dtype=torch.bfloat16, device="cuda:0"), 8).view(torch.uint8)
    dst = torch.empty(size_bytes, dtype=torch.uint8, device="cuda:1")
    return size_bytes / _median_cuda_s(lambda: dst.copy_(src, non_blocking=True), repeats)


def duplex_bytes_per_s(size_bytes: int = 1024 * MiB, repeats: int = 5, device: str = "cuda") -> float:
    """Total bytes/s of a pinned H2D and a pinned D2H of `size_bytes` each, running at the same time on
    two streams."""
    dev_src = _fill_random(torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device), 7).view(torch.uint8)
    host_src = _pinned(size_bytes)
    host_src.copy_(dev_src)
    dev_dst = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    host_dst = _pinned(size_bytes)
    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    start = torch.cuda.Event(enable_timing=True)
    ends = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
    times = []
    for i in range(repeats + 1):                                        # the first round is warm-up
        torch.cuda.synchronize()
        start.record()
        for stream, end, (dst, src) in zip((up, down), ends, ((dev_dst, host_src), (host_dst, dev_src))):
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
                end.record(stream)
        for end in ends:
            end.synchronize()
        if i:
            times.append(max(start.elapsed_time(e) for e in ends) / 1e3)
    return 2.0 * size_bytes / statistics.median(times)


def pageable_h2d_bytes_per_s(size_bytes: int = 1024 * MiB, repeats: int = 5, device: str = "cuda") -> float:
    """H2D bytes/s from ordinary (pageable) host memory."""
    host = _fill_random(torch.empty(size_bytes // 4, dtype=torch.float32), 8)
    dev = torch.empty_like(host, device=device)
    return size_bytes / _median_cuda_s(lambda: dev.copy_(host), repeats, warmup=1, target_s=0.0)


def cpu_dram_bytes_per_s(size_bytes: int = 1024 * MiB, repeats: int = 5) -> tuple[float, float]:
    """(copy, read) bytes/s of host DRAM with torch on all threads: copy counts read + write bytes,
    read is a sum over the tensor."""
    src = _fill_random(torch.empty(size_bytes // 4, dtype=torch.float32), 9)
    dst = torch.empty_like(src)
    dst.fill_(1.0)                                                      # fault the pages in
    copy = 2.0 * size_bytes / _median_cpu_s(lambda: dst.copy_(src), repeats)
    read = size_bytes / _median_cpu_s(lambda: src.sum(), repeats)
    return copy, read


def cpu_matmul_flops(dtype: torch.dtype = torch.float32, max_n: int = 4096, target_s: float = 0.3,
                     repeats: int = 3) -> tuple[float, int]:
    """(FLOP/s, n) of an n x n x n matmul on the CPU, n the largest power of two <= max_n whose call
    takes about target_s or less (so a CPU without fast bf16 units does not take minutes)."""
    def rate(n: int, reps: int) -> float:
        a = _fill_random(torch.empty(n, n, dtype=dtype), 10)
        b = _fill_random(torch.empty(n, n, dtype=dtype), 11)
        out = torch.empty(n, n, dtype=dtype)
        return 2.0 * n ** 3 / _median_cpu_s(lambda: torch.matmul(a, b, out=out), reps)

    n = min(256, max_n)
    r = rate(n, 1)
    while n < max_n and 2.0 * (2 * n) ** 3 / r <= target_s:
        n *= 2
    return rate(n, repeats), n


def reference_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """GQA decode attention with torch SDPA: one query token per sequence attends its whole context.

    q [batch, q_heads, head_dim], k and v [batch, kv_heads, ctx, head_dim] -> [batch, q_heads, head_dim].
    The q heads of a group become the query rows of their kv head, so K and V are read once, never
    repeated; SDPA's CPU kernel accumulates in fp32."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, hq // hkv, d)                                   # [batch, kv_heads, group, d]
    return F.scaled_dot_product_attention(qg, k, v).reshape(b, hq, d)


def runtime_attention_kernel() -> tuple[AttentionKernel, str]:
    """The runtime's CPU decode-attention kernel as (callable with reference_decode_attention's
    signature, name): runtime.cpu_attention.decode_attention with every slot of k's view valid (starts
    0, ends ctx), called as the pipeline calls it; torch SDPA if that module is absent."""
    try:
        from ..cpu_attention import decode_attention
    except ImportError:
        return reference_decode_attention, "torch SDPA GQA decode (reference; runtime.cpu_attention absent)"
    takes_num_slots = "num_slots" in inspect.signature(decode_attention).parameters

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, ctx = k.shape[0], k.shape[2]
        starts = torch.zeros(b, dtype=torch.long)                       # [batch]
        ends = torch.full((b,), ctx, dtype=torch.long)                  # [batch]
        extra = {"num_slots": ctx} if takes_num_slots else {}
        return decode_attention(q, k, v, starts, ends, **extra).view(q.shape)

    return kernel, "runtime.cpu_attention.decode_attention"


def cpu_attention_bytes_per_s(shapes: Sequence[tuple[int, int]] = ATTENTION_SHAPES, num_attention_heads: int = 32,
                              num_key_value_heads: int = 8, head_dim: int = 128,
                              dtype: torch.dtype = torch.bfloat16, kernel: AttentionKernel | None = None,
                              repeats: int = 5) -> list[float]:
    """KV bytes/s (the K and V of ctx slots, read once) of a CPU decode-attention kernel at each
    (batch, ctx).

    kernel(q [batch, q_heads, d], k [batch, kv_heads, ctx, d], v [same]) -> [batch, q_heads, d];
    default: the runtime's own kernel (`runtime_attention_kernel`). As in the runtime's KV cache, k and
    v are whole contiguous blocks of ctx slots (the runtime passes the fused kernel its cache block whole
    and masks the slots beyond the context; a view of the first ctx slots of a longer block is a strided
    array to numba, whose loops over it do not vectorise: H200 call 35 measured bf16 at 16 GB/s so, against
    52-62 over whole blocks)."""
    kernel = kernel or runtime_attention_kernel()[0]
    rates = []
    for i, (batch, ctx) in enumerate(shapes):
        cache_shape = (batch, num_key_value_heads, ctx, head_dim)
        k = _fill_random(torch.empty(cache_shape, dtype=dtype), 20 + i)    # [batch, kv_heads, ctx, d]
        v = _fill_random(torch.empty(cache_shape, dtype=dtype), 40 + i)
        q = torch.randn(batch, num_attention_heads, head_dim).to(dtype)              # [batch, q_heads, d]
        s = _median_cpu_s(lambda q=q, k=k, v=v: kernel(q, k, v), repeats)    # (k, v bound: freed below)
        rates.append(2.0 * k.numel() * k.element_size() / s)
        del k, v
    return rates


KV_FORMAT_SHAPE = (600, 288)
"""(batch, ctx) at which the profile times the decode attention over each 8-bit KV format against bf16: a
whole-model plan's micro-batch (H200 calls 27-30: 600-1,100 sequences of ~272 slots)."""
KV_FORMAT_SHAPE_QUICK = (8, 64)


def cpu_attention_time_of_compute(formats: Sequence[str], shape: tuple[int, int] = KV_FORMAT_SHAPE,
                                  num_attention_heads: int = 32, num_key_value_heads: int = 8, head_dim: int = 128,
                                  repeats: int = 5) -> dict[str, float]:
    """Per scaled 8-bit KV format (hrm.formats), the runtime's decode attention's time over a cache of that
    format (runtime.cpu_attention.quantize_kv of the same values) over its time over the bf16 cache (each a
    whole block, page-locked where CUDA is present, as the runtime holds it; H200 call 35 measured 0.21 for
    int8 against a strided bf16 view, where benchmarks/cpu_attention_rate.py over whole blocks measured
    0.79), at
    (batch, ctx) = `shape`, each the median of `repeats` calls taken in turns (bf16, then each format, and
    again; after one warm-up call of each), so that a drift of the host's speed reaches every format alike:
    what hrm prices such a cache's attention at (KVFormat.cpu_attention_time_of_compute, the default where a
    profile has none). The kernels are the runtime's defaults for each (DECODE_KERNEL, QUANT_DECODE_KERNEL)."""
    from hrm.formats import kv_format

    from ..cpu_attention import QuantKV, quantize_kv
    from ..host_memory import empty_host

    def host(x: torch.Tensor) -> torch.Tensor:                 # page-locked where CUDA is, as the runtime's cache
        return empty_host(tuple(x.shape), x.dtype).copy_(x)

    def quantized(x: torch.Tensor, name: str) -> QuantKV:
        qx = quantize_kv(x, kv_format(name))
        return QuantKV(host(qx.data), host(qx.scale))

    kernel = runtime_attention_kernel()[0]
    batch, ctx = shape
    cache_shape = (batch, num_key_value_heads, ctx, head_dim)                   # whole blocks (see above)
    k = _fill_random(empty_host(cache_shape, torch.bfloat16), 60)                # [batch, kv_heads, ctx, d]
    v = _fill_random(empty_host(cache_shape, torch.bfloat16), 61)
    q = torch.randn(batch, num_attention_heads, head_dim).to(torch.bfloat16)     # [batch, q_heads, d]
    caches = {"bf16": (k, v), **{name: (quantized(k, name), quantized(v, name)) for name in formats}}
    times: dict[str, list[float]] = {name: [] for name in caches}
    for turn in range(repeats + 1):
        for name, (kc, vc) in caches.items():
            t0 = time.perf_counter()
            kernel(q, kc, vc)
            if turn:                                   # the first turn warms every kernel up
                times[name].append(time.perf_counter() - t0)
    base_s = statistics.median(times["bf16"])
    return {name: statistics.median(times[name]) / base_s for name in formats}


cpu_name = local_cpu_name


def cpu_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
        raise
