"""The grouped MoE path's activation in one pass over the gate|up GEMM's output: a = silu(gate) * up * w.

Three elementwise kernels (silu, times up, times the routing weight) read and wrote the [pairs, I]
activations five times; on the H200 they took 1.15 of the 5.9 ms of a Mixtral MoE layer at 4,096 tokens
(benchmarks/results/whole_model/h200-2026-12-02-call5/moe_kernels.json). Where Triton runs (CUDA builds of
torch ship it), one kernel reads gate and up once, computes in fp32, and writes a once; elsewhere, or if
the kernel fails its check against the three-kernel form, that form. Same math, rounded once instead of
three times (H200 2026-12-04 call 43: 0.16 ms at that layer; the MoE layer's routed rate 445 -> 513 TFLOP/s,
benchmarks/moe_calibration.py). MOE_LIGHTNING_SWIGLU_KERNEL=0 in the environment keeps the three-kernel
form (for an A/B).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:                                       # the CPU build of torch has no Triton
    import triton
    import triton.language as tl
except ImportError:                        # pragma: no cover - depends on the torch build
    triton = None

_BLOCK = 1024
_FUSED_OK: dict[tuple[int | None, torch.dtype], bool] = {}   # (CUDA device index, dtype) -> the kernel checked


def silu_mul_weighted_reference(gu: torch.Tensor, w: torch.Tensor, inter: int) -> torch.Tensor:
    """gu [pairs, 2I] (gate | up), w [pairs] -> silu(gate) * up * w [pairs, I] in gu's dtype, in three
    kernels (consumes gu's gate half in place)."""
    return F.silu(gu[:, :inter], inplace=True).mul(gu[:, inter:]).mul_(w[:, None])


if triton is not None:
    @triton.jit
    def _silu_mul_weighted(gu_ptr, w_ptr, out_ptr, inter, gu_row_stride, out_row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < inter
        gate = tl.load(gu_ptr + row * gu_row_stride + cols, mask=keep).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_row_stride + inter + cols, mask=keep).to(tl.float32)
        w = tl.load(w_ptr + row).to(tl.float32)
        a = gate / (1.0 + tl.exp(-gate)) * up * w
        tl.store(out_ptr + row * out_row_stride + cols, a.to(out_ptr.dtype.element_ty), mask=keep)


def _fused(gu: torch.Tensor, w: torch.Tensor, inter: int) -> torch.Tensor:
    out = torch.empty(gu.shape[0], inter, dtype=gu.dtype, device=gu.device)
    if gu.shape[0]:
        grid = (gu.shape[0], triton.cdiv(inter, _BLOCK))
        _silu_mul_weighted[grid](gu, w.contiguous(), out, inter, gu.stride(0), out.stride(0), BLOCK=_BLOCK)
    return out


def fused_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the one-pass kernel runs here and agrees with the three-kernel form (checked once per device
    and dtype, on 37 pairs of an odd width; never while a CUDA graph is being captured, which the check's
    synchronisation would break: the graph then holds the three-kernel form)."""
    if triton is None or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if os.environ.get("MOE_LIGHTNING_SWIGLU_KERNEL", "1") == "0":
        return False
    key = (device.index, dtype)
    if key not in _FUSED_OK:
        if torch.cuda.is_current_stream_capturing():
            return False
        debug = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)       # the check's one sync is not the caller's (tests forbid syncs)
        try:
            g = torch.Generator().manual_seed(0)
            gu = (torch.randn(37, 2 * 1100, generator=g) * 3).to(device, dtype)
            w = torch.rand(37, generator=g).to(device)
            ref = silu_mul_weighted_reference(gu.clone(), w, 1100).float()
            ok = bool(torch.allclose(_fused(gu, w, 1100).float(), ref, rtol=2e-2, atol=2e-2))
        except Exception:                  # noqa: BLE001 - any failure to build or launch: use the fallback
            ok = False
        finally:
            torch.cuda.set_sync_debug_mode(debug)
        _FUSED_OK[key] = ok
    return _FUSED_OK[key]


def silu_mul_weighted(gu: torch.Tensor, w: torch.Tensor, inter: int) -> torch.Tensor:
    """gu [pairs, 2I] (gate | up, rows contiguous), w [pairs] -> silu(gate) * up * w [pairs, I] in gu's
    dtype: the one-pass kernel where it is available, else the three-kernel form (which consumes gu)."""
    if gu.stride(1) == 1 and fused_available(gu.device, gu.dtype):
        return _fused(gu, w, inter)
    return silu_mul_weighted_reference(gu, w, inter)
