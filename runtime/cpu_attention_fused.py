"""Fused CPU decode attention (numba): K and V read once each, straight from the cache in its stored format
(bf16 bits, int8 or fp8 with one fp32 scale per token and kv head), converted in registers as they are
loaded, never staged; the (sequence, kv head) items split over numba's threads, the GIL released.

Per (sequence b, kv head h), with the group's g query rows q[b, h] (fp32, pre-scaled by 1/sqrt(d); padded
with zero rows to a multiple of TILE = 4):
  pass 1: for each tile of 4 slots all valid, the 4 x 4 dot products of 4 query rows with the 4 K rows in
          one pass over d (16 vector accumulators; each loaded element used 4 times) into scores[g, t]; a
          tile with a masked slot goes slot by slot over its valid slots; then per row the K scale, the
          maximum over the valid slots;
  softmax over the valid slots in place (a vectorised exp(s - max), the row's sum; times the V scale);
  pass 2: over the same tiles, acc[g, :] += sum over the tile's slots of p[g, t] * V[t] (each accumulator
          row loaded and stored once per 4 slots); out = acc / sum.
Each tile asks (llvm.prefetch) for the cache lines PREFETCH_SLOTS slots ahead. The conversion is chosen at
compile time by the stored dtype (uint16 bf16 bits shifted into fp32's upper half; int8 converted; uint8
fp8 e4m3 codes looked up in a 256-entry table).
Slots outside [starts, ends) (the mask) are neither read nor weighted; a row with no valid slot gives zeros,
as SDPA does. fp32 arithmetic throughout; the bf16 rounding of SDPA's inputs is the only difference from
the reference (runtime.cpu_attention's SDPA), which the tests bound.

numba compiles the kernel on its first call (several seconds; cached on disk after). `available()` says
whether numba can be imported; without it runtime.cpu_attention offers only its torch kernels.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

try:
    import numba as nb
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic, overload
except ImportError:              # pragma: no cover - numba is a dependency; this keeps the torch kernels usable
    nb = None

def available() -> bool:
    return nb is not None


def _fp8_table() -> np.ndarray:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


FP8_TABLE = _fp8_table()
_NO_SCALE = np.ones((1, 1, 1), np.float32)


TILE = 4
"""Query rows and slots per tile: a K tile's 16 dot products share each loaded q and K element (16 vector
accumulators), a V tile's 16 weights stay in registers while each accumulator row is loaded and stored once
per 4 slots. The group is padded with zero query rows to a multiple of TILE (their results never read)."""
SETTINGS_ENV = {"prefetch_slots": "MOE_LIGHTNING_FUSED_PREFETCH_SLOTS", "vector_bits": "MOE_LIGHTNING_FUSED_VECTOR_BITS",
                "inline": "MOE_LIGHTNING_FUSED_INLINE"}
"""The kernel's compile-time settings (below) and the environment variables that set them."""
PREFETCH_SLOTS = int(os.environ.get(SETTINGS_ENV["prefetch_slots"], "8"))
"""How far ahead (in slots) a tile asks for the cache lines it will read next (llvm.prefetch): the hardware
prefetcher alone leaves each thread waiting on DRAM at every page."""
VECTOR_BITS = int(os.environ.get(SETTINGS_ENV["vector_bits"], "512"))
"""The widest vectors LLVM may pick for the kernel's loops: 256 is LLVM's own preference on AVX-512 hosts
(its prefer-256-bit tuning); 512 lifts it (numba's CPU features for the process, set before numba compiles
anything, and only where the host has AVX-512). H200 host (Xeon, family 6 model 207), 14 threads, Mixtral
shapes, ctx 288, ms at 600 / 1,800 sequences (benchmarks/results/whole_model/h200-2026-12-03-call35):
bf16 12.10 / 36.01 at 512 bits against 12.02 / 48.15 at 256; int8 9.72 / 28.24 against 13.87 / 29.16."""
INLINE = os.environ.get(SETTINGS_ENV["inline"], "always")
"""numba's inlining of the tile functions into the item loop ("always": no call, with its exploded array
arguments, per tile; "never": separate functions)."""
def settings() -> dict:
    """The settings this process compiled the kernel with (keys as SETTINGS_ENV's)."""
    return {"prefetch_slots": PREFETCH_SLOTS, "vector_bits": VECTOR_BITS, "inline": INLINE}


_CACHED = PREFETCH_SLOTS == 8 and INLINE == "always"
"""numba's disk cache knows the source file, not these settings (compiled in as constants): other values
compile afresh in each process. The vector width is in the cache's key (the CPU features)."""


def _kernel(q, q_bits, k, v, k_scale, v_scale, scaled, lut, mask, out, out_bits, parts):
    """q [B, H, G, D] f32 (pre-scaled by 1/sqrt(D)), or q_bits (bf16 bits, scaled here) where q is empty;
    k, v [B, H, T>=t, D] stored values (uint16 bf16 bits, int8, or uint8 fp8 codes: the dtype picks the
    conversion at compile time); k_scale, v_scale [B, H, T] f32 (read iff scaled); mask [B, t] bool;
    out [B, H, G, D] f32, or out_bits (bf16 bits, rounded to nearest even) where out is empty. The B * H
    (sequence, kv head) items are split into `parts` runs, each with its scratch allocated once."""
    B, H, G, D = out_bits.shape if out.size == 0 else out.shape
    t_max = mask.shape[1]
    n = B * H
    parts = max(1, min(n, parts))
    for c in nb.prange(parts):
        g4 = (G + TILE - 1) // TILE * TILE
        qi = np.zeros((g4, D), np.float32)
        scores = np.zeros((g4, t_max), np.float32)
        acc = np.empty((g4, D), np.float32)
        top = np.empty(G, np.float32)
        for i in range(c * n // parts, (c + 1) * n // parts):
            b = i // H
            h = i - b * H
            _attend(q, q_bits, k, v, k_scale, v_scale, scaled, lut, mask, out, out_bits, b, h, qi, scores, acc, top)


def _attend(q, q_bits, k, v, k_scale, v_scale, scaled, lut, mask, out, out_bits, b, h, qi, scores, acc, top):
    """One (sequence, kv head): K pass, softmax, V pass, into out[b, h]."""
    G, D = top.shape[0], qi.shape[1]
    g4, t_max = qi.shape[0], mask.shape[1]
    if q.size == 0:
        inv_sqrt_d = np.float32(1.0 / np.sqrt(D))
        for g in range(G):
            for j in range(D):
                qi[g, j] = np.uint32(np.uint32(q_bits[b, h, g, j]) << np.uint32(16)).view(np.float32) * inv_sqrt_d
    else:
        for g in range(G):
            for j in range(D):
                qi[g, j] = q[b, h, g, j]
    for t in range(0, t_max, TILE):                  # K pass: scores of valid slots (others never read)
        _prefetch_ahead(k, b, h, t, t_max)
        if _whole_tile(mask, b, t):
            for g0 in range(0, g4, TILE):
                _scores_tile(qi, g0, k, b, h, t, lut, scores)
        else:
            for u in range(t, min(t + TILE, t_max)):
                if mask[b, u]:
                    for g0 in range(0, g4, TILE):
                        _scores_slot(qi, g0, k, b, h, u, lut, scores)
    for g in range(G):                               # the K scale, the mask, each row's maximum
        m = np.float32(-3.0e38)
        for t in range(t_max):
            s = scores[g, t] * k_scale[b, h, t] if scaled else scores[g, t]
            m = max(m, s if mask[b, t] else np.float32(-3.0e38))
            scores[g, t] = s
        top[g] = m
    for g in range(G):                               # softmax numerators (times the V scale), 1 / their sum
        m = top[g]
        total = np.float32(0.0)
        for t in range(t_max):
            p = _exp(scores[g, t] - m) if mask[b, t] else np.float32(0.0)
            total += p
            scores[g, t] = p * v_scale[b, h, t] if scaled else p
        top[g] = np.float32(1.0) / total if total > 0 else np.float32(0.0)
    acc[:] = 0.0
    for t in range(0, t_max, TILE):                  # V pass over the same valid slots
        _prefetch_ahead(v, b, h, t, t_max)
        if _whole_tile(mask, b, t):
            for g0 in range(0, g4, TILE):
                _acc_tile(acc, g0, scores, v, b, h, t, lut)
        else:
            for u in range(t, min(t + TILE, t_max)):
                if mask[b, u]:
                    for g0 in range(0, g4, TILE):
                        _acc_slot(acc, g0, scores, v, b, h, u, lut)
    for g in range(G):
        inv = top[g]
        if out.size == 0:
            for j in range(D):
                u32 = np.float32(acc[g, j] * inv).view(np.uint32)
                out_bits[b, h, g, j] = np.uint16((u32 + np.uint32(0x7FFF) + ((u32 >> np.uint32(16)) & np.uint32(1)))
                                                 >> np.uint32(16))
        else:
            for j in range(D):
                out[b, h, g, j] = acc[g, j] * inv


def _whole_tile(mask, b, t):
    return t + TILE <= mask.shape[1] and mask[b, t] and mask[b, t + 1] and mask[b, t + 2] and mask[b, t + 3]


def _prefetch_ahead(x, b, h, t, t_max):
    """Ask for the cache lines of slots t + PREFETCH_SLOTS .. + TILE of x[b, h] (those below t_max)."""
    step = max(1, 64 // x.itemsize)
    for u in range(t + PREFETCH_SLOTS, min(t + PREFETCH_SLOTS + TILE, t_max)):
        for j in range(0, x.shape[3], step):
            _prefetch(x, b, h, u, j)


def _value(x, lut):
    """A stored value as fp32 (the overload below picks the conversion by the stored dtype)."""
    return np.float32(x)


def _scores_tile(qi, g0, x, b, h, t, lut, scores):
    """scores[g0..+4, t..+4] = q rows g0..+4 . slots t..+4 of x[b, h], converted as they are loaded: 16 dot
    products in one pass over d."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for j in range(qi.shape[1]):
        r0, r1 = _value(x[b, h, t, j], lut), _value(x[b, h, t + 1, j], lut)
        r2, r3 = _value(x[b, h, t + 2, j], lut), _value(x[b, h, t + 3, j], lut)
        a = qi[g0, j]
        s00, s01, s02, s03 = s00 + a * r0, s01 + a * r1, s02 + a * r2, s03 + a * r3
        a = qi[g0 + 1, j]
        s10, s11, s12, s13 = s10 + a * r0, s11 + a * r1, s12 + a * r2, s13 + a * r3
        a = qi[g0 + 2, j]
        s20, s21, s22, s23 = s20 + a * r0, s21 + a * r1, s22 + a * r2, s23 + a * r3
        a = qi[g0 + 3, j]
        s30, s31, s32, s33 = s30 + a * r0, s31 + a * r1, s32 + a * r2, s33 + a * r3
    scores[g0, t], scores[g0, t + 1], scores[g0, t + 2], scores[g0, t + 3] = s00, s01, s02, s03
    scores[g0 + 1, t], scores[g0 + 1, t + 1], scores[g0 + 1, t + 2], scores[g0 + 1, t + 3] = s10, s11, s12, s13
    scores[g0 + 2, t], scores[g0 + 2, t + 1], scores[g0 + 2, t + 2], scores[g0 + 2, t + 3] = s20, s21, s22, s23
    scores[g0 + 3, t], scores[g0 + 3, t + 1], scores[g0 + 3, t + 2], scores[g0 + 3, t + 3] = s30, s31, s32, s33


def _scores_slot(qi, g0, x, b, h, t, lut, scores):
    """One slot's scores for q rows g0..+4 (a tile's slots not all valid)."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(qi.shape[1]):
        r = _value(x[b, h, t, j], lut)
        s0, s1, s2, s3 = s0 + qi[g0, j] * r, s1 + qi[g0 + 1, j] * r, s2 + qi[g0 + 2, j] * r, s3 + qi[g0 + 3, j] * r
    scores[g0, t], scores[g0 + 1, t], scores[g0 + 2, t], scores[g0 + 3, t] = s0, s1, s2, s3


def _acc_tile(acc, g0, p, x, b, h, t, lut):
    """acc[g0..+4, :] += p[g0..+4, t..+4] x slots t..+4 of x[b, h], converted as they are loaded."""
    w00, w01, w02, w03 = p[g0, t], p[g0, t + 1], p[g0, t + 2], p[g0, t + 3]
    w10, w11, w12, w13 = p[g0 + 1, t], p[g0 + 1, t + 1], p[g0 + 1, t + 2], p[g0 + 1, t + 3]
    w20, w21, w22, w23 = p[g0 + 2, t], p[g0 + 2, t + 1], p[g0 + 2, t + 2], p[g0 + 2, t + 3]
    w30, w31, w32, w33 = p[g0 + 3, t], p[g0 + 3, t + 1], p[g0 + 3, t + 2], p[g0 + 3, t + 3]
    for j in range(acc.shape[1]):
        r0, r1 = _value(x[b, h, t, j], lut), _value(x[b, h, t + 1, j], lut)
        r2, r3 = _value(x[b, h, t + 2, j], lut), _value(x[b, h, t + 3, j], lut)
        acc[g0, j] += w00 * r0 + w01 * r1 + w02 * r2 + w03 * r3
        acc[g0 + 1, j] += w10 * r0 + w11 * r1 + w12 * r2 + w13 * r3
        acc[g0 + 2, j] += w20 * r0 + w21 * r1 + w22 * r2 + w23 * r3
        acc[g0 + 3, j] += w30 * r0 + w31 * r1 + w32 * r2 + w33 * r3


def _acc_slot(acc, g0, p, x, b, h, t, lut):
    """One slot's weighted row into q rows g0..+4 (a tile's slots not all valid)."""
    w0, w1, w2, w3 = p[g0, t], p[g0 + 1, t], p[g0 + 2, t], p[g0 + 3, t]
    for j in range(acc.shape[1]):
        r = _value(x[b, h, t, j], lut)
        acc[g0, j] += w0 * r
        acc[g0 + 1, j] += w1 * r
        acc[g0 + 2, j] += w2 * r
        acc[g0 + 3, j] += w3 * r


def _exp(x):
    """exp(x) for x <= 0 in a form LLVM vectorises (no SVML): 2^n times a degree-6 polynomial of the
    remainder, to about 2 ulp; below -87 it gives about 1e-38 instead of the subnormal or zero."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)      # x - n ln2, in two parts
    p = np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)


def _prefetch_codegen(context, builder, sig, args):
    """llvm.prefetch (read, into every cache level) of the address of x[b, h, t, j]."""
    x = context.make_array(sig.args[0])(context, builder, args[0])
    ptr = cgutils.get_item_pointer2(context, builder, x.data, cgutils.unpack_tuple(builder, x.shape),
                                    cgutils.unpack_tuple(builder, x.strides), sig.args[0].layout, list(args[1:]),
                                    wraparound=False, boundscheck=False)
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
    return context.get_dummy_value()


def _prefetch_typer(typingctx, x, b, h, t, j):
    return types.void(x, b, h, t, j), _prefetch_codegen


def _value_overload(x, lut):
    if x == types.uint16:                            # bf16 bits: the upper half of an fp32
        return lambda x, lut: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    if x == types.uint8:                             # fp8 e4m3 codes: the table
        return lambda x, lut: lut[np.intp(x)]
    return lambda x, lut: np.float32(x)              # int8 values


def _allow_512_bit_vectors() -> None:
    """numba's CPU features for this process less LLVM's prefer-256-bit tuning, where the host has AVX-512
    and nothing (the user's NUMBA_CPU_FEATURES, an earlier setting) chose them already."""
    import llvmlite.binding as ll

    host = ll.get_host_cpu_features().flatten()
    if "+avx512f" in host.split(",") and not nb.config.CPU_FEATURES:
        nb.config.CPU_FEATURES = host + ",-prefer-256-bit"


if nb is not None:
    if VECTOR_BITS >= 512:
        _allow_512_bit_vectors()
    _prefetch = intrinsic(_prefetch_typer)
    overload(_value, inline="always")(_value_overload)
    _jit = nb.njit(fastmath=True, nogil=True, cache=_CACHED, inline=INLINE)
    _whole_tile, _prefetch_ahead, _exp = _jit(_whole_tile), _jit(_prefetch_ahead), _jit(_exp)
    _scores_tile, _scores_slot = _jit(_scores_tile), _jit(_scores_slot)
    _acc_tile, _acc_slot = _jit(_acc_tile), _jit(_acc_slot)
    _attend = _jit(_attend)
    _compiled = nb.njit(parallel=True, fastmath=True, nogil=True, cache=_CACHED)(_kernel)
else:
    _compiled = None
_EMPTY_F32 = np.zeros((0, 0, 0, 0), np.float32)
_EMPTY_BITS = np.zeros((0, 0, 0, 0), np.uint16)


def _as_block(x: torch.Tensor) -> torch.Tensor:
    """x, or where x [B, H, t, (d)] is the first t slots of each (row, head) of a contiguous block of T >= t
    slots in the same storage, that block (the mask keeps the kernel to the first t): numba compiles a
    strided view as an array of any layout, whose loops do not vectorise (H200 call 35: bf16 read at 16 GB/s
    over such views, 52-62 over blocks)."""
    if x.is_contiguous() or x.dim() < 3 or x.stride(-1) != 1:
        return x
    inner = x.shape[3] if x.dim() == 4 else 1
    slots, rest = divmod(x.stride(1), inner)
    whole = (x.shape[0], x.shape[1], slots) + tuple(x.shape[3:])
    contiguous = torch.empty(whole, device="meta").stride()
    if rest or slots < x.shape[2] or x.stride() != contiguous:
        return x
    needed = x.storage_offset() + x.shape[0] * x.stride(0)
    if needed * x.element_size() > x.untyped_storage().nbytes():
        return x
    return x.as_strided(whole, contiguous)


def _stored(x: torch.Tensor) -> np.ndarray:
    """A cache tensor's stored values as a numpy view (no copy), its dtype saying how to read them: uint16
    bf16 bits, int8 values, uint8 fp8 codes."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    if x.dtype == torch.int8:
        return x.numpy()
    if x.dtype == torch.float8_e4m3fn:
        return x.view(torch.uint8).numpy()
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
    k_np, v_np = _stored(_as_block(kd)), _stored(_as_block(vd))
    ks, vs = (_as_block(k.scale).numpy(), _as_block(v.scale).numpy()) if scaled else (_NO_SCALE, _NO_SCALE)
    m = mask.reshape(b, mask.shape[-1]).numpy()
    parts = 4 * nb.get_num_threads()                 # the calling thread's numba threads (set_threads)
    if q.dtype == torch.bfloat16:
        out = torch.empty(b, n_q * d, dtype=torch.bfloat16)
        _compiled(_EMPTY_F32, q.view(torch.int16).numpy().view(np.uint16).reshape(grouped), k_np, v_np, ks, vs,
                  scaled, FP8_TABLE, m, _EMPTY_F32, out.view(torch.int16).numpy().view(np.uint16).reshape(grouped),
                  parts)
        return out
    qf = (q.to(torch.float32) * (1.0 / math.sqrt(d))).reshape(grouped).contiguous()
    out = np.empty(grouped, np.float32)
    _compiled(qf.numpy(), _EMPTY_BITS, k_np, v_np, ks, vs, scaled, FP8_TABLE, m, out, _EMPTY_BITS, parts)
    return torch.from_numpy(out).view(b, n_q * d).to(q.dtype)


def set_threads(n: int | None) -> None:
    """numba's threads for the calling thread's kernels (the attention worker's)."""
    if nb is not None and n:
        nb.set_num_threads(min(n, nb.config.NUMBA_NUM_THREADS))
