"""Decode attention over a KV cache (GQA-aware, fp32 accumulation) and the single worker thread that runs
it on the CPU next to the cache. torch releases the GIL inside its kernels, so GPU launches from the main
thread continue while the worker computes.

GQA without expanding K/V: the n_q / n_kv query heads of a group become the query rows of their kv head
(q viewed as [B, n_kv, group, d]), so every K/V slot is read once per kv head.

A cache in the compute dtype (k, v tensors [B, n_kv, T, d]) is read by the kernel DECODE_KERNEL names:
  "sdpa":     torch's fused SDPA over the grouped view (the CPU flash kernel: bf16/fp16 inputs, fp32 scores,
              softmax and accumulation, K/V read in blocks, nothing materialised);
  "bmm":      explicit batched matmuls over the whole batch, K and V upcast to fp32 (decode_attention_bmm);
  "chunked":  the same in chunks of ATTENTION_CHUNK_SEQUENCES sequences, each chunk's K (then V) upcast
              into one reused fp32 workspace that stays in the cores' caches;
  "bmm_bf16": batched matmuls in the cache's dtype (fp32 inside the GEMM, scores rounded to it: ~0.4% of a
              logit); fastest where the CPU multiplies bf16 natively, less exact than the others;
  "fused":    runtime.cpu_attention_fused (numba): one thread per (sequence, kv head) reads its K, then its V,
              once, converting rows in registers; bf16 caches and bf16 queries only (others: "sdpa"). The
              default where numba imports (H200, 14 threads, Mixtral shapes, ctx 288: 13.6 / 35.8 ms at 600 /
              1,800 sequences against SDPA's 16.8 / 49.7, benchmarks/results/whole_model/h200-2026-12-03-call29).
An 8-bit cache (QuantKV: int8 or float8_e4m3fn values [B, n_kv, T, d] and one fp32 scale per token and kv
head [B, n_kv, T], hrm.formats.KVFormat) is read in place by the kernel QUANT_DECODE_KERNEL names, chunk
by chunk, never dequantized whole:
  "chunked":      a chunk's values converted into the fp32 workspace; the K scales multiply the scores and
                  the V scales the probabilities (per slot), so no scaled copy of K or V is made;
  "chunked_sdpa": a chunk dequantized into the compute dtype (values times scales), then the fused SDPA;
  "chunked_bf16": as "chunked" with the values converted to bf16 (exact for int8) and bf16 matmuls
                  (scores and probabilities rounded to bf16, as "bmm_bf16");
  "fused":        the fused kernel over the 8-bit values and their scales (the default where numba imports:
                  on the 2-core dev machine, B=48 ctx 288, 4.0 ms against 6.4 for "chunked").
The environment variables MOE_LIGHTNING_DECODE_KERNEL and MOE_LIGHTNING_QUANT_DECODE_KERNEL override the
defaults (benchmarks/cpu_attention_rate.py times every kernel at the pipeline's shapes to choose them).
A sequence with no valid slot gets zeros, as SDPA gives.
On the 2-core AVX2 dev machine (torch 2.13, 2 threads, bf16, 32/8 heads, d 128) the grouped SDPA is the
fastest of sdpa and bmm: B=22 ctx 272: 16.0 ms vs 37.3 (bmm, bf16 scores), 41.5 (bmm, fp32 scores).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hrm.formats import ATTENTION_CHUNK_SEQUENCES, KVFormat, kv_format

from . import cpu_attention_fused as fused

DECODE_KERNEL = os.environ.get("MOE_LIGHTNING_DECODE_KERNEL", "fused" if fused.available() else "sdpa")
QUANT_DECODE_KERNEL = os.environ.get("MOE_LIGHTNING_QUANT_DECODE_KERNEL", "fused" if fused.available() else "chunked")
ACC = torch.float32
STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


# ---- 8-bit KV -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantKV:
    """One cache tensor (K or V) in a scaled 8-bit format: data [..., T, d] (int8 or float8_e4m3fn), scale
    [..., T] fp32 (value = data * scale). Indexing applies to both (the last index of data, d, excepted),
    so `kc[a:b, :, :t]` is a view of rows a..b and slots < t, as for a plain tensor."""
    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.data.numel()

    def data_ptr(self) -> int:
        return self.data.data_ptr()

    def record_stream(self, stream) -> None:
        self.data.record_stream(stream)
        self.scale.record_stream(stream)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, idx) -> "QuantKV":
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx) or len(idx) >= self.data.dim():
            raise IndexError("QuantKV takes indices of its leading dims only (not the head dim, no ...)")
        return QuantKV(self.data[idx], self.scale[idx])

    def copy_(self, src, non_blocking: bool = False) -> "QuantKV":
        """Copy a QuantKV of the same format, or quantize a float tensor into this one."""
        if not isinstance(src, QuantKV):
            src = quantize_kv(src.to(self.device, non_blocking=non_blocking), self.format)
        self.data.copy_(src.data, non_blocking=non_blocking)
        self.scale.copy_(src.scale, non_blocking=non_blocking)
        return self

    @property
    def format(self) -> KVFormat:
        return kv_format("int8" if self.data.dtype == torch.int8 else "fp8")

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """value = data * scale in `dtype` (tests and the chunked SDPA; the attention never calls it on a
        whole cache)."""
        return (self.data.to(ACC) * self.scale[..., None]).to(dtype)


def quantize_kv(x: torch.Tensor, fmt: KVFormat) -> QuantKV:
    """Symmetric round to nearest of x [..., d] with one fp32 scale per vector of d (max|x| / qmax; an
    all-zero vector gets scale 1), on x's device. One fp32 temporary the size of x."""
    lo, hi = torch.aminmax(x, dim=-1)                                     # no |x| temporary
    scale = torch.maximum(-lo, hi).to(ACC).div_(fmt.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    tmp = x.to(ACC, copy=True).div_(scale[..., None])
    if fmt.name == "int8":
        tmp.round_()
    tmp.clamp_(-fmt.qmax, fmt.qmax)
    data = torch.empty(x.shape, dtype=STORAGE_DTYPES[fmt.name], device=x.device)
    data.copy_(tmp)
    return QuantKV(data, scale)


# ---- masks ------------------------------------------------------------------------------------------------

def valid_slots(starts: torch.Tensor, ends: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, num_slots] bool: slot s of sequence b is attended iff starts[b] <= s < ends[b]."""
    s = torch.arange(num_slots, device=starts.device)
    return (s[None, :] >= starts[:, None]) & (s[None, :] < ends[:, None])


def attention_mask(starts: torch.Tensor, ends: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, 1, 1, num_slots] bool mask for decode_attention(mask=...): build it once per decode step and
    micro-batch (it does not depend on the layer)."""
    return valid_slots(starts, ends, num_slots)[:, None, None, :]


def decode_attention(q: torch.Tensor, k, v, starts: torch.Tensor | None, ends: torch.Tensor | None,
                     num_slots: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence over its cached slots [starts[b], ends[b]).
    q [B, n_q, d]; k, v [B, n_kv, T, d] tensors, or QuantKV of that shape -> [B, n_q * d] (q's dtype).
    num_slots >= max(ends) bounds the slots read (pass it to avoid a device sync). `mask`
    (attention_mask(starts, ends, >= num_slots), precomputed) replaces starts/ends. Slots outside the ranges
    are masked but still multiplied (weight 0), so they must hold finite values (the cache is zeroed).
    Accumulation in fp32 (see module doc)."""
    t = int(ends.max()) if num_slots is None else num_slots
    if mask is None:
        mask = attention_mask(starts, ends, t)                             # [B, 1, 1, T]
    elif mask.shape[-1] != t:
        mask = mask[..., :t]
    name, table = (QUANT_DECODE_KERNEL, QUANT_KERNELS) if isinstance(k, QuantKV) else (DECODE_KERNEL, KERNELS)
    if name == "fused":
        quant = isinstance(k, QuantKV)
        if q.device.type == "cpu" and (quant or k.dtype == q.dtype == torch.bfloat16):
            return fused.decode_attention_fused(q, k, v, mask)             # the whole block: read in place
        name = "chunked" if quant else "sdpa"     # it reads bf16 and 8-bit caches in host memory only (a
        #                                           cache on the GPU: attention on the GPU, S4)
    return table[name](q, k[:, :, :t], v[:, :, :t], mask)


# ---- kernels over a cache in the compute dtype ------------------------------------------------------------
# Each: q [B, n_q, d]; k, v [B, n_kv, t, d] (already cut to the slots to read); mask [B, 1, 1, t] bool
# -> [B, n_q * d] in q's dtype.

def decode_attention_sdpa(q, k, v, mask, chunk: int | None = None) -> torch.Tensor:
    """The fused SDPA over the grouped view, over the whole batch (chunk None) or chunk by chunk."""
    b, n_q, d = q.shape
    n_kv = k.shape[1]
    if chunk is None:
        out = F.scaled_dot_product_attention(q.view(b, n_kv, n_q // n_kv, d), k, v, attn_mask=mask)
        return out.reshape(b, n_q * d)
    out = q.new_empty(b, n_q * d)
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        out[s:e] = decode_attention_sdpa(q[s:e], k[s:e], v[s:e], mask[s:e])
    return out


def decode_attention_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GQA decode attention with batched matmuls, K/V never expanded. Scores are computed in fp32 (q and K
    upcast): a 16-bit matmul rounds its output to 16 bits, which would put ~1e-2 relative error on the
    logits before the softmax; softmax in fp32 over the valid slots (-inf elsewhere), P @ V in fp32 too,
    one rounding at the end."""
    b, n_q, d = q.shape
    n_kv = k.shape[1]
    acc = torch.promote_types(q.dtype, ACC)
    qg = q.view(b, n_kv, n_q // n_kv, d).to(acc) * (1.0 / math.sqrt(d))  # [B, n_kv, g, d]
    scores = torch.matmul(qg, k.to(acc).transpose(-1, -2))                # [B, n_kv, g, T]
    p = _softmax(scores, ~mask)
    out = torch.matmul(p, v.to(acc))                                        # [B, n_kv, g, d]
    return out.reshape(b, n_q * d).to(q.dtype)


def decode_attention_bmm_bf16(q, k, v, mask) -> torch.Tensor:
    """Batched matmuls in the cache's dtype (scores and probabilities rounded to it), softmax in fp32."""
    b, n_q, d = q.shape
    n_kv = k.shape[1]
    qg = q.view(b, n_kv, n_q // n_kv, d) * (1.0 / math.sqrt(d))
    p = _softmax(torch.matmul(qg, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, ACC)), ~mask)
    return torch.matmul(p.to(v.dtype), v).reshape(b, n_q * d).to(q.dtype)


def _softmax(scores: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with `invalid` slots excluded; a row with no valid slot gives zeros."""
    scores.masked_fill_(invalid, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return p.masked_fill_(invalid, 0.0)           # an all-invalid row is NaN after the softmax


_local = threading.local()


def _workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer of at least `numel` elements, reused across calls (a fresh one per call would
    fault its pages in every time)."""
    key = (name, dtype, device)
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def decode_attention_chunked(q, k, v, mask, chunk: int = ATTENTION_CHUNK_SEQUENCES,
                             compute: torch.dtype | None = None) -> torch.Tensor:
    """Batched matmuls chunk by chunk of `chunk` sequences. k, v: tensors, or QuantKV (8-bit values, fp32
    scales per slot): the values of a chunk are converted into one reused workspace (K, then V) in
    `compute` (default fp32, or q's dtype where wider); the K scales multiply the scores and the V scales
    the probabilities, slot by slot. compute=bf16 multiplies in bf16 (int8 values are exact in it; the
    scores and probabilities are rounded to it), softmax in fp32 either way."""
    b, n_q, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    g = n_q // n_kv
    quant = isinstance(k, QuantKV)
    kd, vd = (k.data, v.data) if quant else (k, v)
    acc = torch.promote_types(q.dtype, ACC)
    compute = compute or acc
    ws = _workspace("chunk", min(chunk, b) * n_kv * t * d, compute, kd.device)
    invalid = ~mask                                                       # [B, 1, 1, t]
    qg = q.view(b, n_kv, g, d)
    out = q.new_empty(b, n_q * d)
    wide = compute == acc
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        c = e - s
        buf = ws[:c * n_kv * t * d].view(c, n_kv, t, d)
        qc = qg[s:e].to(compute) * (1.0 / math.sqrt(d)) if wide else qg[s:e].to(compute)   # [c, n_kv, g, d]
        buf.copy_(kd[s:e])
        scores = torch.matmul(qc, buf.transpose(-1, -2)).to(acc)          # [c, n_kv, g, t]
        if not wide:
            scores.mul_(1.0 / math.sqrt(d))
        if quant:
            scores.mul_(k.scale[s:e, :, None, :])
        p = _softmax(scores, invalid[s:e])
        if quant:
            p.mul_(v.scale[s:e, :, None, :])
        buf.copy_(vd[s:e])
        out[s:e] = torch.matmul(p.to(compute), buf).view(c, n_q * d)      # [c, n_kv, g, d], cast on store
    return out


def decode_attention_chunked_sdpa(q, k: QuantKV, v: QuantKV, mask, chunk: int = ATTENTION_CHUNK_SEQUENCES):
    """An 8-bit cache chunk by chunk: its values times their scales into the compute dtype (one reused
    workspace for K and V), then the fused SDPA over the chunk."""
    b, n_q, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    c0 = min(chunk, b)
    ws = _workspace("chunk", c0 * n_kv * t * d, ACC, k.device)             # fp32 staging of the values
    kbuf = _workspace("sdpa_kv", 2 * c0 * n_kv * t * d, q.dtype, k.device).view(2, c0, n_kv, t, d)
    out = q.new_empty(b, n_q * d)
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        c = e - s
        stage = ws[:c * n_kv * t * d].view(c, n_kv, t, d)
        for i, x in enumerate((k, v)):
            stage.copy_(x.data[s:e])
            torch.mul(stage, x.scale[s:e, :, :, None], out=kbuf[i, :c])
        out[s:e] = decode_attention_sdpa(q[s:e], kbuf[0, :c], kbuf[1, :c], mask[s:e])
    return out


KERNELS: dict[str, Callable] = {"sdpa": decode_attention_sdpa, "bmm": decode_attention_bmm,
                                "chunked": decode_attention_chunked, "bmm_bf16": decode_attention_bmm_bf16}
QUANT_KERNELS: dict[str, Callable] = {
    "chunked": decode_attention_chunked, "chunked_sdpa": decode_attention_chunked_sdpa,
    "chunked_bf16": lambda q, k, v, mask: decode_attention_chunked(q, k, v, mask, compute=torch.bfloat16)}
if fused.available():                    # without numba, naming it is refused below like any unknown kernel
    KERNELS["fused"] = QUANT_KERNELS["fused"] = fused.decode_attention_fused
for _name, _table in ((DECODE_KERNEL, KERNELS), (QUANT_DECODE_KERNEL, QUANT_KERNELS)):
    if _name not in _table:
        raise ValueError(f"unknown decode attention kernel {_name!r}; known: {', '.join(_table)}")


# ---- the worker ---------------------------------------------------------------------------------------------

HOST_CORES_RESERVED = 2
"""Cores the attention kernels leave free while the main thread drives a GPU: one for the launching
thread, one for the CUDA driver's and the copy engines' host work. An OpenMP team that shares a core with
a busy thread waits for its slowest member at every barrier."""


def attention_threads(drives_gpu: bool, ranks: int = 1) -> int | None:
    """Intra-op threads for the attention worker: all but HOST_CORES_RESERVED when the main thread
    drives a GPU, else None (torch's default: on the CPU the main thread's own work is the GPU's). One of
    `ranks` tensor-parallel processes on the host gets its share of the host's cores (torchrun sets each
    process's torch threads to 1)."""
    if not drives_gpu:
        return None
    cores = torch.get_num_threads() if ranks <= 1 else (os.cpu_count() or ranks) // ranks
    return max(1, cores - HOST_CORES_RESERVED)


class AttentionWorker:
    """One thread for CPU attention (and the KV appends that precede it), as the artifact.
    `num_threads`: torch intra-op threads of that thread (None: torch's default)."""

    def __init__(self, num_threads: int | None = None) -> None:
        self.num_threads = num_threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-attention",
                                        initializer=self._set_threads)

    def _set_threads(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
            fused.set_threads(self.num_threads)

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
