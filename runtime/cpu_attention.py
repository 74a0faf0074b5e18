"""Decode attention over a KV cache (GQA-aware, fp32 accumulation) and the single worker thread that runs
it on the CPU next to the cache. torch releases the GIL inside its kernels, so GPU launches from the main
thread continue while the worker computes.

GQA without expanding K/V: the n_q / n_kv query heads of a group become the query rows of their kv head
(q viewed as [B, n_kv, group, d]), so every K/V slot is read once per kv head. Two kernels with that
layout, chosen by DECODE_KERNEL:
  "sdpa": torch's fused SDPA over the grouped view (the CPU flash kernel: bf16/fp16 inputs, fp32 scores,
          softmax and accumulation, K/V read in blocks, nothing materialised);
  "bmm":  explicit batched matmuls (decode_attention_bmm), scores and softmax in fp32.
On the 2-core AVX2 dev machine (torch 2.13, 2 threads, bf16, 32/8 heads, d 128) the grouped SDPA is the
fastest: B=22 ctx 272: 16.0 ms vs 37.3 (bmm, bf16 scores), 41.5 (bmm, fp32 scores) and 38.5 ms for the old
SDPA(enable_gqa) call; B=64 ctx 1024: 44 ms vs 400 / 548 / 395 ms.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F

DECODE_KERNEL = "sdpa"      # "sdpa" (grouped fused SDPA) or "bmm" (decode_attention_bmm)


def valid_slots(starts: torch.Tensor, ends: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, num_slots] bool: slot s of sequence b is attended iff starts[b] <= s < ends[b]."""
    s = torch.arange(num_slots, device=starts.device)
    return (s[None, :] >= starts[:, None]) & (s[None, :] < ends[:, None])


def attention_mask(starts: torch.Tensor, ends: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, 1, 1, num_slots] bool mask for decode_attention(mask=...): build it once per decode step and
    micro-batch (it does not depend on the layer)."""
    return valid_slots(starts, ends, num_slots)[:, None, None, :]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor | None,
                     ends: torch.Tensor | None, num_slots: int | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence over its cached slots [starts[b], ends[b]).
    q [B, n_q, d]; k, v [B, n_kv, T, d] -> [B, n_q * d] (q's dtype). num_slots >= max(ends) bounds the
    slots read (pass it to avoid a device sync). `mask` (attention_mask(starts, ends, >= num_slots),
    precomputed) replaces starts/ends. Slots outside the ranges are masked but still multiplied (weight
    0), so they must hold finite values (the cache is zeroed). Accumulation in fp32 (see module doc)."""
    b, n_q, d = q.shape
    t = int(ends.max()) if num_slots is None else num_slots
    if mask is None:
        mask = attention_mask(starts, ends, t)                             # [B, 1, 1, T]
    elif mask.shape[-1] != t:
        mask = mask[..., :t]
    if DECODE_KERNEL == "bmm":
        return decode_attention_bmm(q, k[:, :, :t], v[:, :, :t], mask)
    n_kv = k.shape[1]
    qg = q.view(b, n_kv, n_q // n_kv, d)                                   # [B, n_kv, group, d]
    out = F.scaled_dot_product_attention(qg, k[:, :, :t], v[:, :, :t], attn_mask=mask)  # [B, n_kv, group, d]
    return out.reshape(b, n_q * d)


def decode_attention_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GQA decode attention with batched matmuls, K/V never expanded. q [B, n_q, d]; k, v [B, n_kv, T, d]
    (already cut to the slots to read); mask [B, 1, 1, T] bool -> [B, n_q * d] in q's dtype.
    Scores are computed in fp32 (q and K upcast): a 16-bit matmul rounds its output to 16 bits, which
    would put ~1e-2 relative error on the logits before the softmax; softmax in fp32 over the valid slots
    (-inf elsewhere), P @ V in fp32 too, one rounding at the end."""
    b, n_q, d = q.shape
    n_kv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.view(b, n_kv, n_q // n_kv, d).to(acc) * (1.0 / math.sqrt(d))  # [B, n_kv, g, d]
    scores = torch.matmul(qg, k.to(acc).transpose(-1, -2))                # [B, n_kv, g, T]
    scores.masked_fill_(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p, v.to(acc))                                        # [B, n_kv, g, d]
    return out.reshape(b, n_q * d).to(q.dtype)


HOST_CORES_RESERVED = 2
"""Cores the attention kernels leave free while the main thread drives a GPU: one for the launching
thread, one for the CUDA driver's and the copy engines' host work. An OpenMP team that shares a core with
a busy thread waits for its slowest member at every barrier."""


def attention_threads(drives_gpu: bool) -> int | None:
    """Intra-op threads for the attention worker: all but HOST_CORES_RESERVED when the main thread
    drives a GPU, else None (torch's default: on the CPU the main thread's own work is the GPU's)."""
    if not drives_gpu:
        return None
    return max(1, torch.get_num_threads() - HOST_CORES_RESERVED)


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

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
