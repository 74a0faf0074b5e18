"""Decode attention over a KV cache (GQA-aware, fp32 accumulation) and the single worker thread that runs
it on the CPU next to the cache. torch releases the GIL inside its kernels, so GPU launches from the main
thread continue while the worker computes.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F


def valid_slots(starts: torch.Tensor, ends: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, num_slots] bool: slot s of sequence b is attended iff starts[b] <= s < ends[b]."""
    s = torch.arange(num_slots, device=starts.device)
    return (s[None, :] >= starts[:, None]) & (s[None, :] < ends[:, None])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                     ends: torch.Tensor, num_slots: int | None = None) -> torch.Tensor:
    """One query token per sequence over its cached slots [starts[b], ends[b]).
    q [B, n_q, d]; k, v [B, n_kv, T, d] -> [B, n_q * d] (q's dtype). num_slots >= max(ends) bounds the
    slots read (pass it to avoid a device sync). Slots outside the ranges are masked but still multiplied
    (weight 0), so they must hold finite values (the cache is zeroed). torch's CPU SDPA kernels accumulate
    16-bit inputs in fp32."""
    b, n_q, d = q.shape
    t = int(ends.max()) if num_slots is None else num_slots
    mask = valid_slots(starts, ends, t)[:, None, None, :]                  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k[:, :, :t], v[:, :, :t], attn_mask=mask,
                                         enable_gqa=True)                  # [B, n_q, 1, d]
    return out.reshape(b, n_q * d)


class AttentionWorker:
    """One thread for CPU attention (and the KV appends that precede it), as the artifact."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-attention")

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
