"""Hardware micro-benchmarks: measure the machine this code runs on, and write a hardware profile.

Every benchmark returns SI units (bytes, bytes/s, FLOP/s, seconds). Timing: warm-up calls first, then
the median of several repeats; GPU work is timed with CUDA events around a loop of calls (so launch
overhead of tiny calls is amortised), CPU work with perf_counter. Data is random and non-zero, and
buffers are large enough to leave the caches (1 GiB copies, 117 MB GEMM weights at Mixtral's shape).

    profile_machine() -> dict        runs them all (progress bar), CPU part only without CUDA
    write_profile_toml(result, ...)  a complete hardware profile in hrm/hardware_profiles/ format

Bandwidth conventions: a device or host *copy* counts read + write bytes; an H2D/D2H transfer counts
the bytes moved once; "duplex" is the total of both directions running at once; CPU attention counts
the K and V bytes the kernel reads.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from hrm.atomic import atomic_write_text
from hrm.hardware import GB, GiB, TFLOPS, HardwareProfile, load_profile, local_cpu_name, parse_profile

MiB = 2 ** 20
KiB = 2 ** 10

# [tokens x hidden] x [hidden x ffn]: decode (1..64 tokens per expert GEMM) to prefill (4096)
GEMM_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
GEMM_TOKENS_QUICK = (1, 16, 256, 4096)
LINK_SIZES = (256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1024 * MiB)
LINK_SIZES_QUICK = (256 * KiB, 4 * MiB, 64 * MiB)
# (batch, context) of one decode-attention call on the CPU
ATTENTION_SHAPES = ((16, 512), (64, 1024), (128, 2048))
ATTENTION_SHAPES_QUICK = ((4, 128),)

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# Decoder layers of the decode-visit probe's model. At one layer a micro-batch's next visit is the same
# layer's next step, so S4's KV prefetch waits on the host append of the visit just before it, a chain that
# runs with L layers meet only L x micro-batches visits later (H200: S4 4.36 ms per visit at one layer,
# 1.90 ms at four; benchmarks/results/h200/2026-11-29b/visit_profile.json).
VISIT_LAYERS = 4
VISIT_VISITS = 512
# the CPU attention rate inside the CGOPipe loop, at these micro-batch sizes (attention_in_pipeline's arguments)
OVERLAP_SETTINGS = (dict(micro_batch=32, micro_batches=8), dict(micro_batch=256, micro_batches=4),
                    dict(micro_batch=1024, micro_batches=2))
"""Whole-model plans run micro-batches of ~900-1,200 (H200, 2026-12-01: 43 ms per attention call at 1,210
sequences of ~272 slots, 31 GB/s, where the curve to 256 priced 46 GB/s)."""
OVERLAP_SETTINGS_QUICK = (dict(micro_batch=16, micro_batches=4, prompt_len=256, steps=4),)


class ProbeError(ValueError):
    """A profile that cannot be produced here (the message says what to pass instead)."""


# ---------------------------------------------------------------------------------------------------
# timing and data

def _median_cuda_s(fn: Callable[[], None], repeats: int, warmup: int = 2, target_s: float = 0.02) -> float:
    """Median seconds per call of `fn` (GPU work on the current stream), timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one_s = max(start.elapsed_time(end) / 1e3, 1e-7)
    inner = int(min(1000, max(1, math.ceil(target_s / one_s))))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _median_cpu_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_BLOCK_ELEMS = 1 << 20


def _fill_random(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Fill `t` with non-zero random values in [0.5, 1.5): exactly on the GPU, tiled from one random
    block on the CPU (memcpy speed; drawing gigabytes with `normal_` on the CPU takes minutes)."""
    flat = t.view(-1)
    n = flat.numel()
    g = torch.Generator(device=t.device).manual_seed(seed)
    if t.device.type == "cuda" or n <= _BLOCK_ELEMS:
        flat.copy_(torch.rand(n, generator=g, device=t.device).add_(0.5))
        return t
    block = torch.rand(_BLOCK_ELEMS, generator=g).add_(0.5).to(t.dtype)
    full = n // _BLOCK_ELEMS
    flat[:full * _BLOCK_ELEMS].view(full, _BLOCK_ELEMS).copy_(block)   # broadcast over rows
    flat[full * _BLOCK_ELEMS:].copy_(block[:n - full * _BLOCK_ELEMS])
    return t


# ---------------------------------------------------------------------------------------------------
# GPU

def gpu_gemm_flops(tokens: Sequence[int] = GEMM_TOKENS, hidden_size: int = 4096, ffn_size: int = 14336,
                   dtype: torch.dtype = torch.bfloat16, repeats: int = 10, device: str = "cuda") -> list[float]:
    """FLOP/s of [tokens x hidden] x [hidden x ffn] (an expert's up projection) for each token count.

    The weight is laid out [ffn, hidden] as the runtime stores it; x @ w.T is what F.linear computes."""
    w = _fill_random(torch.empty(ffn_size, hidden_size, dtype=dtype, device=device), 1)   # [ffn, hidden]
    x_all = _fill_random(torch.empty(max(tokens), hidden_size, dtype=dtype, device=device), 2)
    rates = []
    for t in tokens:
        x = x_all[:t]                                                   # [tokens, hidden]
        out = torch.empty(t, ffn_size, dtype=dtype, device=device)     # [tokens, ffn]
        s = _median_cuda_s(lambda: torch.matmul(x, w.t(), out=out), repeats)
        rates.append(2.0 * t * hidden_size * ffn_size / s)
    return rates


MOE_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b")
"""Expert shapes the profile measures the runtime's MoE layer at: 8 large experts (14336 x 4096, top-2),
128 small ones (768 x 2048, top-8), 64 of 1024 x 2048 (top-8); the profiled model's own shape is added."""
MOE_TOKENS_PER_EXPERT = (32, 128, 512, 2048)
MOE_TOKENS_PER_EXPERT_QUICK = (128, 1024)


def moe_shape(spec) -> list[int]:
    """[hidden, intermediate, experts, top-k]: the key of a measured MoE curve."""
    return [spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.num_experts_per_tok]


def gpu_moe_flops(spec, tokens_per_expert: Sequence[float] = MOE_TOKENS_PER_EXPERT, repeats: int = 5,
                  device: str = "cuda") -> list[float]:
    """Routed-expert FLOP/s (top-k FLOPs, hrm.ops.routed_experts) of the runtime's own MoE layer by tokens
    per expert (calls of tokens_per_expert * experts / top-k tokens): runtime.moe.moe through the
    page-table view the pipeline passes, on one MoE layer of `spec` with synthetic bf16 weights, every
    expert resident. It holds what plain GEMMs do not: routing, the per-expert split and gathers, the
    combination."""
    from dataclasses import replace

    from hrm import ops

    from . import moe
    from .synthetic import synthesize
    from .weights import WeightStore

    one = replace(spec, first_dense_layers=0).with_layers(1)
    store = WeightStore(one, torch.bfloat16, device, num_resident=one.num_experts, num_pages=1)
    synthesize(store, seed=0, progress=False)
    layer, table = store.dense.layers[0], store.lookup(0, 0)
    rates = []
    for per_expert in tokens_per_expert:
        t = max(1, round(per_expert * one.num_experts / one.num_experts_per_tok))
        h = _fill_random(torch.empty(t, one.hidden_size, dtype=torch.bfloat16, device=device), 3)  # [t, hidden]
        s = _median_cuda_s(lambda: moe.moe(h, layer, table, one), repeats)
        rates.append(float(ops.routed_experts(one, t).flops) / s)
    del store
    return rates


def prefill_rest_flops(spec, tokens: Sequence[int], layer_flops_per_s: Sequence[float], prompt_len: int,
                       repeats: int = 5, device: str = "cuda") -> list[float | None]:
    """FLOP/s of the runtime's prefill layer without its routed experts, per chunk of `tokens` tokens:
    the layer's measured time less the MoE layer's at the same tokens, over the FLOPs of the rest
    (hrm.ops.layer_gpu_ops and attention). None where the MoE alone took as long as the layer."""
    from hrm import ops

    per_expert = [float(ops.tokens_per_expert(spec, t)) for t in tokens]
    moe_rates = gpu_moe_flops(spec, per_expert, repeats=repeats, device=device)
    out = []
    for t, layer_rate, moe_rate in zip(tokens, layer_flops_per_s, moe_rates):
        seqs = t // prompt_len
        layer_s = float(ops.prefill_layer(spec, seqs, prompt_len).flops) / layer_rate
        moe_flops = float(ops.routed_experts(spec, t).flops)
        rest_s = layer_s - moe_flops / moe_rate
        out.append((float(ops.prefill_layer(spec, seqs, prompt_len).flops) - moe_flops) / rest_s
                   if rest_s > 0 else None)
    return out


def _random_prompts(spec, n: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """n prompts of `length` random token ids (clear of the vocabulary's first and last ten)."""
    return torch.randint(10, max(11, spec.vocab_size - 10), (n, length), generator=generator).tolist()


PREFILL_PROMPT_LEN = 256
PREFILL_SEQS = (4, 8, 16)          # sequences per chunk: 1,024 to 4,096 tokens (PREFILL_CHUNK_TOKENS)
PREFILL_SEQS_QUICK = (4, 16)
PREFILL_LAYERS = (2, 6)


def resident_weight_bytes(spec) -> float:
    """Device bytes of a model with every expert resident (the memory account's weight parts, bf16)."""
    from dataclasses import replace

    from hrm.memory import MemoryProfile, PassShape, account
    from hrm.spec import DTypes, Workload

    m = account(replace(spec, dtypes=DTypes.named("bfloat16")), PassShape.nominal(Workload.uniform(1, 1), 1, 1, 0.0),
                1.0, profile=MemoryProfile())
    return m.gpu["non_expert_weights"] + m.gpu["resident_experts"]


_MEMORY_PROBE = """
import json, sys, torch
import runtime.engine
from runtime.memory import rss_bytes
out = {}
if sys.argv[1] == "gpu":
    a = torch.randn(1024, 1024, device="cuda")
    (a @ a).sum().item()
    del a
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    out["cuda_context_bytes"] = total - free - torch.cuda.memory_reserved()
else:
    out["cuda_context_bytes"] = 0
out["process_baseline_bytes"] = rss_bytes()
print(json.dumps(out))
"""


def memory_baseline(gpu: bool, quick: bool = False) -> dict:
    """The stack's own memory, measured in a fresh runtime process (the profiler's own process has done
    too much to stand for one): its resident set and CUDA context once the runtime is imported and the
    GPU has run a matmul; and the caching allocator's slack, reserved minus allocated at the peak of a
    small Engine pass here (Mixtral shapes, two layers; its second pass), per byte of its account's workspace."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                    os.environ.get("PYTHONPATH", "")])))
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "gpu" if gpu else "cpu"], capture_output=True,
                          text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise ProbeError(f"memory probe failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["gpu_allocator_frac"], out["allocator_probe"] = 0.0, "nothing (no GPU)"
    if gpu:
        from hrm.hf_config import load_model
        from hrm.policy import Policy

        from .engine import Engine
        spec = load_model("mixtral-8x7b").with_layers(2)
        n, mu = (32, 16) if quick else (256, 128)
        with Engine(spec, Policy(n, mu, weights_gpu_frac=0.5), progress=False) as eng:
            prompts = _random_prompts(spec, n, 256, torch.Generator().manual_seed(0))
            eng.generate(prompts, 4)
            torch.cuda.reset_peak_memory_stats()
            eng.generate(prompts, 4)
            alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            workspace = eng.last_account.gpu["workspace"]
        out["gpu_allocator_frac"] = (reserved - alloc) / workspace
        out["allocator_probe"] = f"runtime.Engine, mixtral-8x7b[2L], N={n} mu={mu} r_w=0.5, prompts 256, 4 tokens"
    return out


def prefill_layers(spec, free_bytes: int, most: int = PREFILL_LAYERS[1]) -> tuple[int, int] | None:
    """The two depths prefill_costs runs at on a GPU with `free_bytes` free: up to `most` layers whose
    resident weights take at most 60% of it (the rest: activations, caches), or None where two do not fit."""
    def fits(k: int) -> bool:
        return resident_weight_bytes(spec.with_layers(spec.first_dense_layers + k)) <= 0.6 * free_bytes
    hi = max((k for k in range(2, most + 1) if fits(k)), default=None)
    if hi is None:
        return None
    return (2, hi) if hi >= 4 else (1, hi)


def prefill_costs(spec, seqs: Sequence[int] = PREFILL_SEQS, prompt_len: int = PREFILL_PROMPT_LEN,
                  chunks: int = 4, layers: tuple[int, int] = PREFILL_LAYERS, repeats: int = 3) -> dict:
    """The runtime's own prefill, split into what grows with layers and what does not. runtime.Engine on
    `layers` MoE layers of `spec`, every expert resident, CPU attention (the KV goes to the host cache
    through the attention worker, as offloading plans do), `chunks` micro-batches of one chunk of each of
    `seqs` sequences of `prompt_len` tokens. The prefill seconds t(L) (the engine's own measurement, the
    median of `repeats` after a warm-up) are a line in L: its slope per chunk is the steady cost of one
    (layer, chunk), staging overlapped by the next chunk's compute; its intercept is paid once per pass
    (inputs, host staging buffers, the last layer's hand-offs).

    flops_per_s: per chunk size, hrm.ops.prefill_layer's FLOPs / seconds per (layer, chunk);
    pass_s_per_token: the median intercept per prompt token."""
    from hrm import ops
    from hrm.policy import Policy

    from .engine import Engine

    g = torch.Generator().manual_seed(0)
    lo, hi = layers
    rates, pass_per_token = [], []
    for n in seqs:
        policy = Policy(batch_size=n * chunks, micro_batch_size=n, weights_gpu_frac=1.0)
        prompts = _random_prompts(spec, n * chunks, prompt_len, g)
        t = {}
        for num_layers in layers:
            model = spec.with_layers(spec.first_dense_layers + num_layers)
            with Engine(model, policy, seed=0, progress=False) as eng:
                eng.generate(prompts, 1)                                   # warm-up
                t[num_layers] = statistics.median(eng.generate(prompts, 1)[1].prefill_s for _ in range(repeats))
        per_layer_chunk_s = max(t[hi] - t[lo], 1e-9) / ((hi - lo) * chunks)
        rates.append(float(ops.prefill_layer(spec, n, prompt_len).flops) / per_layer_chunk_s)
        pass_per_token.append(max(0.0, t[lo] - lo * chunks * per_layer_chunk_s) / (n * chunks * prompt_len))
    return {"flops_per_s": rates, "pass_s_per_token": statistics.median(pass_per_token)}


def gpu_square_gemm_flops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                          device: str = "cuda") -> float:
    """FLOP/s of an n x n x n GEMM (the dense peak; fp32 uses torch's current TF32 setting)."""
    a = _fill_random(torch.empty(n, n, dtype=dtype, device=device), 3)
    b = _fill_random(torch.empty(n, n, dtype=dtype, device=device), 4)
    out = torch.empty(n, n, dtype=dtype, device=device)
    s = _median_cuda_s(lambda: torch.matmul(a, b, out=out), repeats)
    return 2.0 * n ** 3 / s


def gpu_hbm_bytes_per_s(size_bytes: int = 1024 * MiB, repeats: int = 10, device: str = "cuda") -> float:
    """Device-to-device copy rate, counting the bytes read plus the bytes written."""
    src = _fill_random(torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device), 5)
    dst = torch.empty_like(src)
    s = _median_cuda_s(lambda: dst.copy_(src), repeats)
    return 2.0 * size_bytes / s


# ---------------------------------------------------------------------------------------------------
# CPU-GPU link

def _pinned(nbytes: int) -> torch.Tensor:
    """Page-locked host bytes, pinned the way the runtime pins its weight store."""
    from .host_memory import empty_host
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


# ---------------------------------------------------------------------------------------------------
# CPU

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
        from .cpu_attention import decode_attention
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
                              repeats: int = 5, headroom_slots: int = 128) -> list[float]:
    """KV bytes/s (the K and V of ctx slots, read once) of a CPU decode-attention kernel at each
    (batch, ctx).

    kernel(q [batch, q_heads, d], k [batch, kv_heads, ctx, d], v [same]) -> [batch, q_heads, d];
    default: the runtime's own kernel (`runtime_attention_kernel`). As in the runtime's KV cache, k and
    v are views of the first ctx slots of a cache with `headroom_slots` more slots for generation."""
    kernel = kernel or runtime_attention_kernel()[0]
    rates = []
    for i, (batch, ctx) in enumerate(shapes):
        cache_shape = (batch, num_key_value_heads, ctx + headroom_slots, head_dim)
        k = _fill_random(torch.empty(cache_shape, dtype=dtype), 20 + i)[:, :, :ctx]   # [batch, kv_heads, ctx, d]
        v = _fill_random(torch.empty(cache_shape, dtype=dtype), 40 + i)[:, :, :ctx]
        q = torch.randn(batch, num_attention_heads, head_dim).to(dtype)              # [batch, q_heads, d]
        s = _median_cpu_s(lambda: kernel(q, k, v), repeats)
        rates.append(2.0 * k.numel() * k.element_size() / s)
        del k, v
    return rates


def runtime_overheads(spec, visits: int = VISIT_VISITS, calls: int = 200, quick: bool = False) -> dict:
    """Fixed costs of the runtime's own decode loop, at sizes where compute and transfers vanish.

    decode_visit_s_by_schedule: per schedule, decode seconds per (micro-batch, layer) visit (see
    decode_visit_costs); decode_visit_s: CGOPipe's.
    cpu_attention_call_s: one decode-attention call of one sequence over 16 slots, submitted to the
    attention worker and waited for (hand-off + kernel-call overhead).
    With CUDA also the CPU attention rate inside the pipelined loop (attention_in_pipeline)."""
    from .cpu_attention import AttentionWorker, attention_threads, decode_attention

    from . import moe

    by_schedule = decode_visit_costs(spec, visits)
    grouped_size = moe.MOE_DENSE_MAX_TOKENS + 1
    grouped = {}
    if torch.cuda.is_available() and moe.grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        grouped = decode_visit_costs(spec, visits, micro_batches=8, micro_batch_size=grouped_size)
    d = spec.head_dim
    q = torch.randn(1, spec.num_attention_heads, d).to(torch.bfloat16)    # [1, q_heads, d]
    k = torch.randn(1, spec.num_key_value_heads, 16, d).to(torch.bfloat16)
    v = torch.randn_like(k)
    starts, ends = torch.zeros(1, dtype=torch.long), torch.full((1,), 16, dtype=torch.long)
    worker = AttentionWorker(attention_threads(torch.cuda.is_available()))
    try:
        for _ in range(10):
            worker.submit(decode_attention, q, k, v, starts, ends).result()
        t0 = time.perf_counter()
        for _ in range(calls):
            worker.submit(decode_attention, q, k, v, starts, ends).result()
        call_s = (time.perf_counter() - t0) / calls
    finally:
        worker.close()
    out = {"decode_visit_s": by_schedule["cgopipe"], "decode_visit_s_by_schedule": by_schedule,
           "decode_visit_s_grouped_by_schedule": grouped, "grouped_above_tokens": moe.MOE_DENSE_MAX_TOKENS,
           "cpu_attention_call_s": call_s, "visit_model": visit_probe(spec, "cgopipe", visits)[0].name}
    if torch.cuda.is_available():
        out.update(attention_in_pipeline_by_micro_batch(spec, quick))
    return out


def _probe_attention_on_gpu() -> dict:
    """Per schedule, where the visit probe runs its attention: on the GPU where the schedule allows it."""
    from hrm.schedules import SCHEDULES
    return {name: sched.attention_on_gpu[-1] for name, sched in SCHEDULES.items()}


def visit_probe(spec, schedule: str, visits: int = VISIT_VISITS, micro_batches: int = 16, micro_batch_size: int = 1,
                layers: int = VISIT_LAYERS):
    """The decode-visit probe's setting for one schedule (see decode_visit_costs): (model, policy,
    prompts, measured decode steps). `layers`: decoder layers after the model's leading dense ones."""
    from dataclasses import replace

    from hrm.policy import Policy

    one = replace(spec.with_layers(spec.first_dense_layers + layers), moe_intermediate_size=16,
                  shared_expert_intermediate_size=16 if spec.shared_expert_intermediate_size else 0)
    steps = max(2, visits // (micro_batches * layers))
    prompts = [[1 + i % 1000, 2, 3, 4] for i in range(micro_batches * micro_batch_size)]
    policy = Policy(batch_size=micro_batches * micro_batch_size, micro_batch_size=micro_batch_size,
                    weights_gpu_frac=0.5, attention_on_gpu=_probe_attention_on_gpu()[schedule], schedule=schedule)
    return one, policy, prompts, steps


def decode_visit_costs(spec, visits: int = VISIT_VISITS, micro_batches: int = 16, micro_batch_size: int = 1,
                       layers: int = VISIT_LAYERS) -> dict[str, float]:
    """Seconds per (micro-batch, layer) visit of the runtime's decode loop under each schedule, where
    compute and transfers vanish: a `layers`-layer copy of `spec` whose experts are 16 wide (the model's
    kernel sequence with tiny expert GEMMs and weight pages), half of them streamed (two expert groups
    and a page copy per visit, as offloading plans run), micro-batches of one sequence over a few tokens,
    KV on the host, stage recording on (as measured runs record). What remains is the host's work per
    visit: kernel launches, stream and event bookkeeping, hand-offs to the attention worker. With
    `micro_batch_size` above runtime.moe.MOE_DENSE_MAX_TOKENS the MoE takes its grouped path (more
    kernels) where the device has one."""
    from .engine import Engine

    out = {}
    for schedule in _probe_attention_on_gpu():
        one, policy, prompts, steps = visit_probe(spec, schedule, visits, micro_batches, micro_batch_size, layers)
        with Engine(one, policy, seed=0, progress=False, record=True) as eng:
            eng.generate(prompts, 3)                                       # warm-up
            _, m = eng.generate(prompts, steps + 1)
        out[schedule] = m.decode_s / (steps * micro_batches * one.num_hidden_layers)
    return out


def attention_in_pipeline_by_micro_batch(spec, quick: bool = False) -> dict:
    """attention_in_pipeline at each of OVERLAP_MICRO_BATCHES (the rate grows with the micro-batch: H200 run
    5 priced 28.7 GB/s from micro-batches of 32, and runs with micro-batches of 200-400 got about 36): the
    first size's figures as before, plus the curve over sizes."""
    settings = OVERLAP_SETTINGS_QUICK if quick else OVERLAP_SETTINGS
    runs = [attention_in_pipeline(spec, **kw) for kw in settings]
    out = dict(runs[0])
    out["cpu_attention_overlapped_micro_batches"] = [kw["micro_batch"] for kw in settings]
    out["cpu_attention_overlapped_bytes_per_s_by_micro_batch"] = [r["cpu_attention_overlapped_bytes_per_s"] for r in runs]
    return out


def attention_in_pipeline(spec, micro_batch: int = 32, micro_batches: int = 8, prompt_len: int = 512,
                          steps: int = 8) -> dict:
    """KV bytes/s of the CPU attention calls inside the runtime's own CGOPipe decode loop on the GPU: the
    rate the attention worker gets while the main thread launches the GPU's work on the same host (GIL
    and cores shared). One layer of `spec`, every expert resident (the link carries activations only),
    micro-batches of `micro_batch` sequences at context ~prompt_len: large enough that the calls' fixed
    costs are small next to their KV reads. Each call's span covers KV append + attention."""
    from hrm.policy import Policy

    from .engine import Engine

    one = spec.with_layers(spec.first_dense_layers + 1)
    policy = Policy(batch_size=micro_batch * micro_batches, micro_batch_size=micro_batch, weights_gpu_frac=1.0)
    g = torch.Generator().manual_seed(0)
    prompts = _random_prompts(spec, policy.batch_size, prompt_len, g)
    with Engine(one, policy, seed=0, progress=False, record=True) as eng:
        eng.generate(prompts, 3)                                           # warm-up
        _, m = eng.generate(prompts, steps + 1)
        spans = [sp for sp in eng.last_spans if sp.phase == "decode" and sp.stage == "cpu_attention"]
    kv_token_bytes = spec.kv_elems_per_token_layer * spec.dtypes.kv_bytes
    ctx_mean = prompt_len + (steps + 1) / 2.0                              # slots read, averaged over steps
    kv_bytes = len(spans) * micro_batch * ctx_mean * kv_token_bytes        # one span per (layer, micro-batch)
    busy_s = sum(sp.end_s - sp.start_s for sp in spans)
    return {"cpu_attention_overlapped_bytes_per_s": kv_bytes / busy_s if busy_s > 0 else 0.0,
            "overlap_shape": [micro_batch, prompt_len], "overlap_calls": len(spans),
            "overlap_decode_visit_s": m.decode_s / (steps * micro_batches * one.num_hidden_layers)}


# ---------------------------------------------------------------------------------------------------
# the whole machine

cpu_name = local_cpu_name


def cpu_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
        raise


def _versions() -> dict:
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return ""

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "", "numpy": version("numpy"),
            "moe_lightning": version("moe-lightning"), "git_commit": commit}


def _model_shapes(spec) -> dict:
    if spec is None:
        return {"model": "mixtral-8x7b", "hidden_size": 4096, "moe_intermediate_size": 14336,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
    return {"model": spec.name, "hidden_size": spec.hidden_size,
            "moe_intermediate_size": spec.moe_intermediate_size,
            "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
            "head_dim": spec.head_dim}


def profile_machine(spec=None, quick: bool = False, progress: bool = True, gpu: bool | None = None,
                    attention_kernel: AttentionKernel | None = None) -> dict:
    """Run every micro-benchmark and return a JSON-ready dict of the results in SI units.

    spec: a ModelSpec for the GEMM and attention shapes (default Mixtral-8x7B's). gpu: profile the GPU
    and the link (default: when CUDA is available). quick: small sizes and few repeats (seconds).
    attention_kernel: the CPU decode-attention kernel to measure (default: the runtime's own)."""
    shapes = _model_shapes(spec)
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    if use_gpu and not torch.cuda.is_available():
        raise ProbeError("no CUDA GPU here")
    rep = 3 if quick else 10
    kernel, kernel_name = (attention_kernel, getattr(attention_kernel, "__name__", "custom")) \
        if attention_kernel else runtime_attention_kernel()
    result = {
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "quick": quick, "versions": _versions(), "shapes": shapes,
        "notes": [], "gpu": None, "link": None,
        "cpu": {"name": cpu_name(), "cores": os.cpu_count() or 1, "torch_threads": torch.get_num_threads(),
                "memory_bytes": cpu_memory_bytes()},
    }
    if not use_gpu:
        result["notes"].append("no CUDA GPU: profiled the CPU part only; [gpu] and [link] are not measured")
    tokens = GEMM_TOKENS_QUICK if quick else GEMM_TOKENS
    link_sizes = LINK_SIZES_QUICK if quick else LINK_SIZES
    big = (64 if quick else 1024) * MiB
    att_shapes = ATTENTION_SHAPES_QUICK if quick else ATTENTION_SHAPES
    steps: list[tuple[str, Callable[[], None]]] = []
    g, lk, c = {}, {}, result["cpu"]

    if use_gpu:
        def gpu_info():
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            g.update(name=props.name, count=torch.cuda.device_count(), memory_bytes=int(total),
                     free_bytes=int(free), multiprocessors=props.multi_processor_count,
                     capability=f"{props.major}.{props.minor}",
                     tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))

        def gemm():
            g["gemm_tokens"] = list(tokens)
            g["gemm_flops_per_s"] = gpu_gemm_flops(tokens, shapes["hidden_size"], shapes["moe_intermediate_size"],
                                                   repeats=rep)
            g["gemm_shape"] = f"[tokens x {shapes['hidden_size']}] x [{shapes['hidden_size']} x " \
                              f"{shapes['moe_intermediate_size']}] bf16"

        def square():
            n = 4096 if quick else 8192
            g["square_gemm_n"] = n
            g["square_gemm_flops_per_s"] = {name: gpu_square_gemm_flops(n, dt, repeats=rep) for name, dt in
                                            (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))}

        def hbm():
            g["hbm_copy_size_bytes"] = big
            g["hbm_copy_bytes_per_s"] = gpu_hbm_bytes_per_s(big, repeats=rep)

        def link():
            lk["sizes_bytes"] = list(link_sizes)
            lk["h2d_bytes_per_s"], lk["d2h_bytes_per_s"] = link_bytes_per_s(link_sizes, repeats=rep)

        def duplex():
            lk["duplex_size_bytes"] = max(link_sizes)
            lk["duplex_bytes_per_s"] = duplex_bytes_per_s(max(link_sizes), repeats=3 if quick else 5)

        def pageable():
            lk["pageable_size_bytes"] = max(link_sizes)
            lk["pageable_h2d_bytes_per_s"] = pageable_h2d_bytes_per_s(max(link_sizes), repeats=3 if quick else 5)

        steps += [("GPU properties", gpu_info), ("GPU GEMM by tokens", gemm), ("GPU square GEMM", square),
                  ("HBM copy", hbm), ("pinned H2D/D2H by size", link), ("H2D + D2H at once", duplex),
                  ("pageable H2D", pageable)]

    def dram():
        c["dram_size_bytes"] = big
        c["dram_copy_bytes_per_s"], c["dram_read_bytes_per_s"] = cpu_dram_bytes_per_s(big, repeats=3 if quick else 5)

    def matmul():
        c["matmul_flops_per_s"], c["matmul_n"] = {}, {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            c["matmul_flops_per_s"][name], c["matmul_n"][name] = cpu_matmul_flops(
                dt, max_n=512 if quick else 4096, repeats=2 if quick else 3)

    def attention():
        # on the runtime's attention worker thread, with the threads it gets (fewer when it shares the
        # host with a GPU-driving main thread)
        from .cpu_attention import AttentionWorker, attention_threads
        worker = AttentionWorker(attention_threads(use_gpu))
        try:
            rates, threads = worker.submit(lambda: (cpu_attention_bytes_per_s(
                att_shapes, shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"],
                torch.bfloat16, kernel, repeats=rep), torch.get_num_threads())).result()
        finally:
            worker.close()
        c["attention"] = {"kernel": kernel_name, "dtype": "bf16", "shapes": [list(s) for s in att_shapes],
                          "threads": threads, "cache_headroom_slots": 128, "kv_bytes_per_s": rates}
        c["attention_kv_bytes_per_s"] = statistics.median(rates)

    def overheads():
        from hrm.hf_config import load_model
        c["runtime"] = runtime_overheads(spec or load_model("mixtral-8x7b"), visits=64 if quick else 256, quick=quick)

    def moe():
        from hrm.hf_config import load_model
        models = [load_model(name) for name in MOE_MODELS]
        if spec is not None and moe_shape(spec) not in [moe_shape(m) for m in models]:
            models.append(spec)
        per_expert = list(MOE_TOKENS_PER_EXPERT_QUICK if quick else MOE_TOKENS_PER_EXPERT)
        g["moe_models"] = [m.name for m in models]
        g["moe_shapes"] = [moe_shape(m) for m in models]
        g["moe_tokens_per_expert"] = [per_expert for _ in models]
        g["moe_flops_per_s"] = [gpu_moe_flops(m, per_expert, repeats=2 if quick else 5) for m in models]

    def prefill():
        from hrm.hf_config import load_model
        seqs = PREFILL_SEQS_QUICK if quick else PREFILL_SEQS
        model = spec or load_model("mixtral-8x7b")
        depths = prefill_layers(model, torch.cuda.mem_get_info()[0])
        if depths is None:
            result["notes"].append("runtime prefill not measured: two layers of the model do not fit the GPU")
            return
        try:
            r = prefill_costs(model, seqs, layers=depths, repeats=2 if quick else 3)
        except Exception as e:  # the other measurements still make a profile; the HRM falls back
            result["notes"].append(f"runtime prefill not measured: {type(e).__name__}: {e}".splitlines()[0])
            return
        g["prefill_prompt_len"] = PREFILL_PROMPT_LEN
        g["prefill_layers"] = list(depths)
        g["prefill_tokens"] = [n * PREFILL_PROMPT_LEN for n in seqs]
        g["prefill_flops_per_s"] = r["flops_per_s"]
        g["prefill_pass_s_per_token"] = r["pass_s_per_token"]
        g["prefill_model"] = model.name
        rest = prefill_rest_flops(model, g["prefill_tokens"], r["flops_per_s"], PREFILL_PROMPT_LEN,
                                  repeats=2 if quick else 5)
        if None in rest:
            result["notes"].append("runtime prefill: the MoE layer alone took as long as the whole layer; "
                                   "the rest of the layer is priced by its roofline")
        else:
            g["prefill_rest_flops_per_s"] = rest

    steps += [("CPU DRAM copy/read", dram), ("CPU matmul fp32/bf16", matmul), ("CPU decode attention", attention)]
    if use_gpu or not quick:
        steps.append(("runtime decode overheads", overheads))
    def memory():
        result["memory"] = memory_baseline(use_gpu, quick=quick)

    if use_gpu:
        steps.append(("runtime MoE layer at prefill sizes", moe))
        steps.append(("runtime prefill layer", prefill))
    steps.append(("runtime process memory", memory))

    t0 = time.perf_counter()
    with _progress(len(steps), progress) as bar:
        for label, step in steps:
            bar.set_postfix_str(label)
            step()
            if use_gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            bar.update()
    if use_gpu:
        result["gpu"], result["link"] = g, lk
    result["elapsed_s"] = time.perf_counter() - t0
    return result


class _Lines:
    """Progress as plain lines on stderr, where tqdm is not installed."""

    def __init__(self, total: int, show: bool):
        self.total, self.done, self.show = total, 0, show

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, label: str) -> None:
        if self.show:
            print(f"profiling [{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def update(self) -> None:
        self.done += 1


def _progress(total: int, show: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, show)
    return tqdm(total=total, desc="profiling", unit="bench", disable=not show, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# writing a profile

def _num(x: float, digits: int = 4) -> str:
    """A positive number with `digits` significant digits, as TOML."""
    x = float(x)
    if not 0 < x < float("inf"):
        raise ProbeError(f"cannot write {x!r} into a profile: every measured number must be positive")
    r = round(x, max(0, digits - 1 - int(math.floor(math.log10(x)))))
    return str(int(r)) if r == int(r) and abs(r) < 1e15 else repr(r)


def _str(s: str) -> str:
    return json.dumps(str(s))          # a JSON string is a valid TOML basic string


def _arr(xs: Sequence[float]) -> str:
    return "[" + ", ".join(_num(x) for x in xs) + "]"


def _table(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {_num(v)}" for k, v in d.items()) + " }"


def _gpu_section_from(hw: HardwareProfile) -> list[str]:
    u, lk = hw.gpu, hw.link
    src = f"from profile {hw.name!r} ({hw.path or 'built-in'}): "
    lines = ["[gpu]", f"name = {_str(u.name)}", f"count = {u.count}",
             f"memory_gib = {_num(u.memory_bytes / GiB)}", f"mem_gb_per_s = {_num(u.mem_bytes_per_s / GB)}",
             f"tflops = {_table({k: v / TFLOPS for k, v in u.peak_flops.items()})}",
             f"source = {_str(src + u.source)}", "", "[link]",
             f"h2d_gb_per_s = {_num(lk.h2d_bytes_per_s / GB)}", f"d2h_gb_per_s = {_num(lk.d2h_bytes_per_s / GB)}",
             f"duplex_gb_per_s = {_num(lk.duplex_bytes_per_s / GB)}"]
    if lk.pageable_h2d_bytes_per_s:
        lines.append(f"pageable_h2d_gb_per_s = {_num(lk.pageable_h2d_bytes_per_s / GB)}")
    lines.append(f"source = {_str(src + lk.source)}")
    return lines


def profile_toml(result: dict, name: str, gpu_from: str | os.PathLike | HardwareProfile | None = None) -> str:
    """The text of a complete hardware profile from `profile_machine`'s result.

    Without a measured GPU, [gpu] and [link] (and the GPU curves of [measured]) come from `gpu_from`
    (a profile name, path, or HardwareProfile); with neither, ProbeError."""
    g, lk, c = result.get("gpu"), result.get("link"), result["cpu"]
    if g is None and gpu_from is None:
        raise ProbeError("no GPU was measured: the [gpu] and [link] sections cannot be written; "
                         "pass --gpu-from PROFILE to take them from an existing profile")
    donor = None
    if g is None:
        donor = gpu_from if isinstance(gpu_from, HardwareProfile) else load_profile(gpu_from)
    v, date = result["versions"], result["date"]
    device = f"{g['count']}x {g['name']}" if g else f"CPU {c['name']} (no GPU)"
    source = f"measured by moe-lightning profile on {date}, torch {v['torch']}, {device}"
    att = c["attention"]
    lines = [f"# Written by `moe-lightning profile` on {result.get('timestamp', date)} ({result.get('host', '')})"
             f"{' in quick mode' if result.get('quick') else ''}.",
             "# Units as in hrm/hardware_profiles/README.md: GB = 1e9 bytes, GiB = 2^30 bytes, TFLOP/s = 1e12 FLOP/s.",
             *[f"# note: {n}" for n in result.get("notes", [])],
             f"name = {_str(name)}"]
    desc = (f"{g['count']}x {g['name']}" if g else f"GPU from profile {donor.name!r}") + \
           f", {c['cores']} cores {c['name']}, {c['memory_bytes'] / GiB:.1f} GiB RAM (measured {date})"
    lines += [f"description = {_str(desc)}", ""]
    if g:
        best_bf16 = max([g["square_gemm_flops_per_s"]["bf16"], *g["gemm_flops_per_s"]])
        tflops = {"bf16": best_bf16 / TFLOPS, "fp16": g["square_gemm_flops_per_s"]["fp16"] / TFLOPS,
                  "fp32": g["square_gemm_flops_per_s"]["fp32"] / TFLOPS}
        top = lk["sizes_bytes"].index(max(lk["sizes_bytes"]))
        h2d, d2h = lk["h2d_bytes_per_s"][top], lk["d2h_bytes_per_s"][top]
        lines += ["[gpu]", f"name = {_str(g['name'])}", f"count = {g['count']}",
                  "# torch.cuda.mem_get_info total",
                  f"memory_gib = {_num(g['memory_bytes'] / GiB)}",
                  "# device copy, read + write bytes",
                  f"mem_gb_per_s = {_num(g['hbm_copy_bytes_per_s'] / GB)}",
                  f"# best measured GEMM: bf16 over {g['square_gemm_n']}^3 and the expert-shape sweep; fp16 and "
                  f"fp32 at {g['square_gemm_n']}^3 (TF32 {'on' if g.get('tf32_matmul') else 'off'})",
                  f"tflops = {_table(tflops)}",
                  f"source = {_str(source)}", "",
                  "[link]",
                  f"# pinned, {lk['sizes_bytes'][top] / MiB:g} MiB transfers",
                  f"h2d_gb_per_s = {_num(h2d / GB)}", f"d2h_gb_per_s = {_num(d2h / GB)}",
                  f"# both directions at once, {lk['duplex_size_bytes'] / MiB:g} MiB each (capped at h2d + d2h)",
                  f"duplex_gb_per_s = {_num(min(lk['duplex_bytes_per_s'], h2d + d2h) / GB)}",
                  f"pageable_h2d_gb_per_s = {_num(lk['pageable_h2d_bytes_per_s'] / GB)}",
                  f"source = {_str(source)}", ""]
    else:
        lines += _gpu_section_from(donor) + [""]
    mm = c["matmul_flops_per_s"]
    lines += ["[cpu]", f"name = {_str(c['name'])}", f"cores = {c['cores']}",
              "# os.sysconf physical pages",
              f"memory_gib = {_num(c['memory_bytes'] / GiB)}",
              f"# DRAM read (sum over {c['dram_size_bytes'] / MiB:g} MiB); copy: "
              f"{_num(c['dram_copy_bytes_per_s'] / GB)} GB/s read + write",
              f"mem_gb_per_s = {_num(c['dram_read_bytes_per_s'] / GB)}",
              f"# n^3 matmul, n = {c['matmul_n']['fp32']} (fp32) and {c['matmul_n']['bf16']} (bf16), "
              f"{c['torch_threads']} torch threads",
              f"tflops = {_table({'bf16': mm['bf16'] / TFLOPS, 'fp32': mm['fp32'] / TFLOPS})}",
              f"source = {_str(source)}", ""]

    lines += ["[measured]"]
    if g:
        lines += [f"# {g['gemm_shape']}", f"gpu_gemm_tokens = {_arr(g['gemm_tokens'])}",
                  f"gpu_gemm_tflops = {_arr([x / TFLOPS for x in g['gemm_flops_per_s']])}",
                  "# pinned, by transfer size",
                  f"h2d_sizes_mib = {_arr([x / MiB for x in lk['sizes_bytes']])}",
                  f"h2d_gb_per_s = {_arr([x / GB for x in lk['h2d_bytes_per_s']])}",
                  f"d2h_sizes_mib = {_arr([x / MiB for x in lk['sizes_bytes']])}",
                  f"d2h_gb_per_s = {_arr([x / GB for x in lk['d2h_bytes_per_s']])}",
                  f"gpu_hbm_gb_per_s = {_num(g['hbm_copy_bytes_per_s'] / GB)}"]
        if g.get("moe_shapes"):
            lines += ["# runtime.moe.moe, one MoE layer, every expert resident, at the expert shapes [hidden, "
                      f"intermediate, experts, top-k] of {', '.join(g['moe_models'])}: routed top-k FLOP/s by "
                      "tokens per expert",
                      f"gpu_moe_shapes = {json.dumps(g['moe_shapes'])}",
                      f"gpu_moe_tokens_per_expert = {json.dumps(g['moe_tokens_per_expert'])}",
                      "gpu_moe_tflops = [" + ", ".join(_arr([x / TFLOPS for x in curve])
                                                       for curve in g["moe_flops_per_s"]) + "]"]
        if g.get("prefill_tokens"):
            lines += [f"# runtime.Engine prefill of {g.get('prefill_model', 'the model')}, every expert resident, "
                      f"CPU attention, prompts of {g['prefill_prompt_len']}: per (layer, chunk) by tokens per chunk "
                      f"(slope over {g['prefill_layers']} layers) the layer's time less the MoE layer's, as FLOP/s "
                      "of hrm.ops.layer_gpu_ops + attention ...",
                      f"gpu_prefill_tokens = {_arr(g['prefill_tokens'])}",
                      *([f"gpu_prefill_rest_tflops = {_arr([x / TFLOPS for x in g['prefill_rest_flops_per_s']])}"]
                        if g.get("prefill_rest_flops_per_s") else []),
                      "# ... and what it pays once per pass, whatever the layers, per prompt token",
                      f"prefill_pass_ns_per_token = {g['prefill_pass_s_per_token'] * 1e9:.4g}"]
    elif donor.measured is not None:
        m = donor.measured
        lines.append(f"# GPU curves from profile {donor.name!r} ({m.method}, {m.date})")
        if m.gpu_gemm_tokens:
            lines += [f"gpu_gemm_tokens = {_arr(m.gpu_gemm_tokens)}",
                      f"gpu_gemm_tflops = {_arr([x / TFLOPS for x in m.gpu_gemm_flops])}"]
        if m.h2d_sizes_bytes:
            lines += [f"h2d_sizes_mib = {_arr([x / MiB for x in m.h2d_sizes_bytes])}",
                      f"h2d_gb_per_s = {_arr([x / GB for x in m.h2d_bytes_per_s])}"]
        if m.gpu_hbm_bytes_per_s:
            lines.append(f"gpu_hbm_gb_per_s = {_num(m.gpu_hbm_bytes_per_s / GB)}")
    h, kv, d = (result["shapes"][k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    lines += [f"# {att['kernel']}, {att['dtype']} K/V, {h}/{kv} heads, d {d}: median over (batch, ctx) below",
              f"cpu_attention_gb_per_s = {_num(c['attention_kv_bytes_per_s'] / GB)}",
              f"cpu_attention_shapes = {json.dumps(att['shapes'])}",
              f"cpu_attention_gb_per_s_by_shape = {_arr([x / GB for x in att['kv_bytes_per_s']])}",
              f"cpu_dram_gb_per_s = {_num(c['dram_read_bytes_per_s'] / GB)}",
              *([f"# runtime.Engine decode loop of {c['runtime']['visit_model']} with 16-wide experts, half streamed, "
                 "mu = 1, recording on: the host's fixed work per visit, by schedule",
                 f"decode_visit_us = {_num(c['runtime']['decode_visit_s'] * 1e6)}",
                 *([f"decode_visit_us_by_schedule = "
                    f"{_table({k: v * 1e6 for k, v in c['runtime']['decode_visit_s_by_schedule'].items()})}"]
                   if c["runtime"].get("decode_visit_s_by_schedule") else []),
                 *([f"# the same with micro-batches of {c['runtime']['grouped_above_tokens'] + 1}: the grouped MoE path",
                    f"grouped_above_tokens = {c['runtime']['grouped_above_tokens']}",
                    f"decode_visit_us_grouped_by_schedule = "
                    f"{_table({k: v * 1e6 for k, v in c['runtime']['decode_visit_s_grouped_by_schedule'].items()})}"]
                   if c["runtime"].get("decode_visit_s_grouped_by_schedule") else []),
                 f"cpu_attention_call_us = {_num(c['runtime']['cpu_attention_call_s'] * 1e6)}"]
                if "runtime" in c else []),
              *([f"# the same kernel's calls inside the runtime's CGOPipe decode loop on the GPU, "
                 f"[batch, ctx] = {c['runtime']['overlap_shape']}: the host also launches the GPU's work",
                 f"cpu_attention_overlapped_gb_per_s = "
                 f"{_num(c['runtime']['cpu_attention_overlapped_bytes_per_s'] / GB)}",
                 *([f"# ... and by micro-batch size (ctx as above)",
                    f"cpu_attention_overlapped_micro_batches = "
                    f"{json.dumps(c['runtime']['cpu_attention_overlapped_micro_batches'])}",
                    f"cpu_attention_overlapped_gb_per_s_by_micro_batch = "
                    f"{_arr([x / GB for x in c['runtime']['cpu_attention_overlapped_bytes_per_s_by_micro_batch']])}"]
                   if len(c["runtime"].get("cpu_attention_overlapped_micro_batches", ())) > 1 else [])]
                if c.get("runtime", {}).get("cpu_attention_overlapped_bytes_per_s") else []),
              f"cpu_dram_copy_gb_per_s = {_num(c['dram_copy_bytes_per_s'] / GB)}"]
    method = "moe-lightning profile (runtime/probe.py): torch micro-benchmarks, median of repeats" + \
             (", quick mode" if result.get("quick") else "") + \
             ("" if g else f"; no GPU here, [gpu] [link] and GPU curves from profile {donor.name!r}")
    lines += [f"method = {_str(method)}", f"date = {_str(date)}", f"model_shapes = {_str(result['shapes']['model'])}"]
    lines += [f"{k}_version = {_str(val)}" for k, val in v.items() if k != "git_commit"]
    lines += [f"git_commit = {_str(v.get('git_commit', ''))}", f"elapsed_s = {_num(result.get('elapsed_s', 1e-3))}", ""]
    mem = result.get("memory")
    if mem:
        lines += ["[memory]",
                  "# a fresh runtime process (python -c, the runtime imported, CUDA up, one matmul): resident set, and the",
                  "# device memory it holds beyond torch's allocator; the allocator's reserved minus allocated peak per byte",
                  "# of the memory account's transient workspace,",
                  f"# over {mem['allocator_probe']}",
                  f"process_baseline_gib = {_num(mem['process_baseline_bytes'] / GiB)}"]
        if g:
            lines += [f"cuda_context_gib = {mem['cuda_context_bytes'] / GiB:.4g}",
                      f"gpu_allocator_frac = {max(mem['gpu_allocator_frac'], 0.0):.4g}"]
        lines += [f"source = {_str(source)}", ""]
    return "\n".join(lines)


def write_profile_toml(result: dict, path: str | os.PathLike, name: str | None = None,
                       gpu_from: str | os.PathLike | HardwareProfile | None = None) -> HardwareProfile:
    """Write the profile atomically (temporary file + os.replace) and return it as loaded.

    The text is parsed with hrm.hardware before anything is written, so a file on disk always loads."""
    path = Path(path)
    name = name or path.stem
    text = profile_toml(result, name, gpu_from)
    profile = parse_profile(tomllib.loads(text), name, str(path))
    atomic_write_text(path, text)
    return profile
