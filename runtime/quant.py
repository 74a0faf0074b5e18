"""Quantized expert weights: W [out, in] to packed bytes with fp16 scales and back (hrm.formats).

Symmetric round to nearest. int8: q in [-127, 127], scale = max|row| / 127 per output channel. int4: q in
[-8, 7], scale = max|group| / 7 per group of 128 inputs of a row, two values to a byte (the even input in
the low nibble, stored as q + 8). `dequantize` gives back the compute-dtype matrix a GEMM multiplies;
`scaled_matmul` computes x @ W.T from the packed form group by group, as a fused kernel would, and is what
the tests hold both against.
"""
from __future__ import annotations

import torch

from hrm.formats import ExpertFormat

_QMAX = {8: 127, 4: 7}


def _scales(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 scales of groups whose largest magnitude is `amax` (an all-zero group gets scale 1)."""
    s = (amax.float() / _QMAX[bits]).to(torch.float16)
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize(w: torch.Tensor, fmt: ExpertFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed [out, in * bits / 8] uint8, scales [out, groups per row] fp16) of W [out, in]."""
    out_f, in_f = w.shape
    fmt.check(in_f)
    if not fmt.scaled:
        raise ValueError(f"{fmt.name} is stored as it is, not quantized")
    g = fmt.group_width(in_f)
    groups = w.float().reshape(out_f, in_f // g, g)                          # [out, G, g]
    scales = _scales(groups.abs().amax(dim=-1), fmt.bits)                   # [out, G]
    qmax = _QMAX[fmt.bits]
    q = torch.round(groups / scales.float()[..., None]).clamp_(-qmax - (fmt.bits == 4), qmax)
    q = q.to(torch.int16).reshape(out_f, in_f)                              # [out, in]
    if fmt.bits == 8:
        return q.to(torch.int8).view(torch.uint8), scales
    nib = (q + 8).to(torch.uint8)                                           # [out, in] in 0..15
    return nib[:, 0::2] | (nib[:, 1::2] << 4), scales


def unpack(packed: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """The integer values [out, in] (int16) of a packed matrix."""
    if fmt.bits == 8:
        return packed.view(torch.int8).to(torch.int16)
    lo, hi = (packed & 0xF).to(torch.int16) - 8, (packed >> 4).to(torch.int16) - 8
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, fmt: ExpertFormat,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [out, in] in `dtype` from its packed form (the value q * scale, rounded once to `dtype`)."""
    q = unpack(packed, fmt)
    out_f, in_f = q.shape
    g = fmt.group_width(in_f)
    w = q.float().reshape(out_f, in_f // g, g) * scales.float()[..., None]
    return w.reshape(out_f, in_f).to(dtype)


def scaled_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """x [tokens, in] @ W.T -> [tokens, out] in fp32 from the packed form: per group, the integer matmul
    scaled by that group's scales (no dequantized matrix)."""
    q = unpack(packed, fmt).float()                                          # [out, in]
    out_f, in_f = q.shape
    g = fmt.group_width(in_f)
    xg = x.float().reshape(x.shape[0], in_f // g, g)                         # [tokens, G, g]
    qg = q.reshape(out_f, in_f // g, g)                                      # [out, G, g]
    partial = torch.einsum("tkg,okg->tok", xg, qg)                           # [tokens, out, G]
    return (partial * scales.float()[None]).sum(dim=-1)
