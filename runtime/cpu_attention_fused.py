"""Fused CPU decode attention (numba): K and V read once each, straight from the cache in its stored format
(bf16 bits, int8 or fp8 with one fp32 scale per token and kv head), converted row by row in registers, never
staged whole; one thread per (sequence, kv head), the GIL released.

Per (sequence b, kv head h), with the group's g query rows q[b, h] (fp32, pre-scaled by 1/sqrt(d)):
  pass 1: for each valid slot t, K[t] converted into a d-vector, its g dot products (times the slot's K
          scale) into scores[g, t]; the running maximum per row;
  softmax over the valid slots in place (exp(s - max), the row's sum);
  pass 2: for each valid slot, V[t] converted, acc[g] += p[g, t] * V-scale * V[t]; out = acc / sum.
Slots outside [starts, ends) (the mask) are neither read nor weighted; a row with no valid slot gives zeros,
as SDPA does. fp32 arithmetic throughout; the bf16 rounding of SDPA's inputs is the only difference from
the reference (runtime.cpu_attention's SDPA), which the tests bound.

numba compiles the kernel on its first call (a few seconds; cached on disk after). `available()` says
whether numba can be imported; without it runtime.cpu_attention offers only its torch kernels.
"""
from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba as nb
except ImportError:              # pragma: no cover - numba is a dependency; this keeps the torch kernels usable
    nb = None

BF16_BITS, INT8_VALUES, FP8_LUT = 0, 1, 2
"""How a cache row's stored values become fp32: bf16 bits shifted into fp32's upper half; int8 values
converted; fp8 e4m3 codes looked up in a 256-entry table."""


def available() -> bool:
    return nb is not None


def _fp8_table() -> np.ndarray:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


FP8_TABLE = _fp8_table()
_NO_SCALE = np.ones((1, 1, 1), np.float32)


SLOT_BLOCK = 8
"""Slots converted and multiplied together: the g dot products of a block reuse q from registers, and the
V accumulation loads and stores each output row once per block rather than once per slot."""


def _kernel(q, q_bits, k, v, k_scale, v_scale, scaled, lut, kind, mask, out, out_bits):
    """q [B, H, G, D] f32 (pre-scaled by 1/sqrt(D)), or q_bits (bf16 bits, scaled here) where q is empty;
    k, v [B, H, T>=t, D] stored values; k_scale, v_scale [B, H, T] f32 (read iff scaled); mask [B, t] bool;
    out [B, H, G, D] f32, or out_bits (bf16 bits, rounded to nearest even) where out is empty."""
    B, H, G, D = out_bits.shape if out.size == 0 else out.shape
    t_max = mask.shape[1]
    inv_sqrt_d = np.float32(1.0 / np.sqrt(D))
    for i in nb.prange(B * H):
        b = i // H
        h = i - b * H
        qi = np.empty((G, D), np.float32)
        for g in range(G):
            for j in range(D):
                if q.size == 0:
                    qi[g, j] = np.uint32(np.uint32(q_bits[b, h, g, j]) << np.uint32(16)).view(np.float32) * inv_sqrt_d
                else:
                    qi[g, j] = q[b, h, g, j]
        bits = np.zeros((SLOT_BLOCK, D), np.uint32)
        rows = bits.view(np.float32)
        scores = np.zeros((G, t_max + SLOT_BLOCK), np.float32)
        top = np.full(G, -np.inf, np.float32)
        for t0 in range(0, t_max, SLOT_BLOCK):
            _convert_block(k, b, h, t0, t_max, mask, kind, lut, bits, rows)
            for g in range(G):
                for u in range(SLOT_BLOCK):
                    s = np.float32(0.0)
                    for j in range(D):
                        s += qi[g, j] * rows[u, j]
                    t = t0 + u
                    if t < t_max and mask[b, t]:
                        if scaled:
                            s *= k_scale[b, h, t]
                        scores[g, t] = s
                        if s > top[g]:
                            top[g] = s
        inv = np.zeros(G, np.float32)
        for g in range(G):
            total = np.float32(0.0)
            for t in range(t_max):
                p = np.float32(0.0)
                if mask[b, t]:
                    p = np.exp(scores[g, t] - top[g])
                    total += p
                scores[g, t] = p * v_scale[b, h, t] if scaled else p
            if total > 0:
                inv[g] = np.float32(1.0) / total
        acc = np.zeros((G, D), np.float32)
        for t0 in range(0, t_max, SLOT_BLOCK):
            _convert_block(v, b, h, t0, t_max, mask, kind, lut, bits, rows)
            for g in range(G):
                for j in range(D):
                    a = acc[g, j]
                    for u in range(SLOT_BLOCK):
                        a += scores[g, t0 + u] * rows[u, j]
                    acc[g, j] = a
        for g in range(G):
            for j in range(D):
                x = acc[g, j] * inv[g]
                if out.size == 0:
                    u32 = np.float32(x).view(np.uint32)
                    out_bits[b, h, g, j] = np.uint16((u32 + np.uint32(0x7FFF) + ((u32 >> np.uint32(16)) & np.uint32(1)))
                                                     >> np.uint32(16))
                else:
                    out[b, h, g, j] = x


def _convert_block(x, b, h, t0, t_max, mask, kind, lut, bits, rows):
    """Slots t0..t0+SLOT_BLOCK of x[b, h] as fp32 rows; slots past t_max or masked become zeros (weight 0)."""
    D = rows.shape[1]
    for u in range(SLOT_BLOCK):
        t = t0 + u
        if t >= t_max or not mask[b, t]:
            for j in range(D):
                bits[u, j] = 0
        elif kind == BF16_BITS:
            for j in range(D):
                bits[u, j] = np.uint32(x[b, h, t, j]) << np.uint32(16)
        elif kind == INT8_VALUES:
            for j in range(D):
                rows[u, j] = np.float32(x[b, h, t, j])
        else:
            for j in range(D):
                rows[u, j] = lut[np.uint8(x[b, h, t, j])]


if nb is not None:
    _convert_block = nb.njit(fastmath=True, nogil=True, cache=True, inline="always")(_convert_block)
    _compiled = nb.njit(parallel=True, fastmath=True, nogil=True, cache=True)(_kernel)
else:
    _compiled = None
_EMPTY_F32 = np.zeros((0, 0, 0, 0), np.float32)
_EMPTY_BITS = np.zeros((0, 0, 0, 0), np.uint16)


def _stored(x: torch.Tensor) -> tuple[np.ndarray, int]:
    """A cache tensor's stored values as a numpy view and how to read them (no copy)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), BF16_BITS
    if x.dtype == torch.int8:
        return x.numpy(), INT8_VALUES
    if x.dtype == torch.float8_e4m3fn:
        return x.view(torch.uint8).numpy(), FP8_LUT
    raise TypeError(f"the fused CPU attention reads bf16, int8 or fp8 caches, not {x.dtype}")


def decode_attention_fused(q: torch.Tensor, k, v, mask: torch.Tensor) -> torch.Tensor:
    """q [B, n_q, d]; k, v [B, n_kv, T, d] bf16 tensors or runtime.cpu_attention.QuantKV (int8 / fp8 values
    and fp32 scales [B, n_kv, T]), T at least the mask's t (pass the whole cache block: a contiguous one
    is read fastest); mask [B, 1, 1, t] bool -> [B, n_q * d] in q's dtype. No torch operation runs (its
    thread team stays asleep): q and the output are read and written as bf16 bits inside the kernel."""
    if _compiled is None:
        raise RuntimeError("the fused CPU attention needs numba (pip install numba)")
    b, n_q, d = q.shape
    scaled = hasattr(k, "scale")
    kd, vd = (k.data, v.data) if scaled else (k, v)
    n_kv = kd.shape[1]
    grouped = (b, n_kv, n_q // n_kv, d)
    k_np, kind = _stored(kd)
    v_np, _ = _stored(vd)
    ks, vs = (k.scale.numpy(), v.scale.numpy()) if scaled else (_NO_SCALE, _NO_SCALE)
    m = mask.reshape(b, mask.shape[-1]).numpy()
    if q.dtype == torch.bfloat16:
        out = torch.empty(b, n_q * d, dtype=torch.bfloat16)
        _compiled(_EMPTY_F32, q.view(torch.int16).numpy().view(np.uint16).reshape(grouped), k_np, v_np, ks, vs,
                  scaled, FP8_TABLE, kind, m, _EMPTY_F32, out.view(torch.int16).numpy().view(np.uint16).reshape(grouped))
        return out
    qf = (q.to(torch.float32) * (1.0 / math.sqrt(d))).reshape(grouped).contiguous()
    out = np.empty(grouped, np.float32)
    _compiled(qf.numpy(), _EMPTY_BITS, k_np, v_np, ks, vs, scaled, FP8_TABLE, kind, m, out, _EMPTY_BITS)
    return torch.from_numpy(out).view(b, n_q * d).to(q.dtype)


def set_threads(n: int | None) -> None:
    """numba's threads for the calling thread's kernels (the attention worker's)."""
    if nb is not None and n:
        nb.set_num_threads(min(n, nb.config.NUMBA_NUM_THREADS))
