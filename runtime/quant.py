"""Quantized expert weights: W [out, in] to packed bytes with fp16 scales and back (hrm.formats).

Symmetric round to nearest. int8: q in [-127, 127], scale = max|row| / 127 per output channel. int4: q in
[-8, 7], scale = max|group| / 7 per group of 128 inputs of a row, two values to a byte (the even input in
the low nibble, stored as q + 8). `dequantize` gives back the compute-dtype matrix a GEMM multiplies;
`scaled_matmul` computes x @ W.T from the packed form group by group, as a fused kernel would, and is what
the tests hold both against.

A quantized expert is stored as bytes (runtime.weights): gate | up | down, each its packed weights then its
fp16 scales (`ExpertLayout`). `dequantize_experts` writes a store of such experts [n, bytes] into the compute
dtype's flat layout [n, 3 I H] that runtime.moe multiplies, chunk by chunk (DEQUANT_CHUNK_ELEMS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hrm.formats import DEQUANT_CHUNK_ELEMS, ExpertFormat
from hrm.spec import ModelSpec

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
    """The integer values [..., out, in] of a packed matrix [..., out, in * bits / 8] (int8 as a view of
    its bytes, int4 as int16)."""
    if fmt.bits == 8:
        return packed.view(torch.int8)
    lo, hi = (packed & 0xF).to(torch.int16) - 8, (packed >> 4).to(torch.int16) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, fmt: ExpertFormat,
               dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [..., out, in] in `dtype` from its packed form [..., out, in * bits / 8] and scales [..., out,
    groups]: the value q * scale computed in fp32 and rounded once to `dtype`, written into `out` (contiguous
    rows) where given. int8: one kernel (the bytes read as int8, the product cast on store); int4: one per
    nibble, each writing every other weight."""
    *lead, out_f, row = packed.shape
    in_f = row * 8 // fmt.bits
    g = fmt.group_width(in_f)
    if out is None:
        out = torch.empty(*lead, out_f, in_f, dtype=dtype, device=packed.device)
    s = scales.to(torch.float32)[..., None]                                   # [..., out, G, 1]
    dst = out.view(*lead, out_f, in_f // g, g)
    if fmt.bits == 8:
        torch.mul(packed.view(torch.int8).view(*lead, out_f, in_f // g, g), s, out=dst)
        return out
    nib = packed.view(*lead, out_f, in_f // g, g // 2)
    torch.mul((nib & 0xF).view(torch.int8) - 8, s, out=dst[..., 0::2])     # even inputs: the low nibble
    torch.mul((nib >> 4).view(torch.int8) - 8, s, out=dst[..., 1::2])
    return out


@dataclass(frozen=True)
class StoredMatrix:
    """Where one matrix of a quantized expert lies in its bytes."""
    name: str
    out_features: int
    in_features: int
    packed_at: int       # byte offset of the packed weights [out, in * bits / 8]
    scales_at: int       # byte offset of the fp16 scales [out, groups]
    elems_at: int        # element offset in the compute dtype's flat expert (gate | up | down)


@dataclass(frozen=True)
class ExpertLayout:
    fmt: ExpertFormat
    matrices: tuple[StoredMatrix, ...]
    nbytes: int          # one expert

    @classmethod
    def of(cls, spec: ModelSpec, fmt: ExpertFormat) -> "ExpertLayout":
        i, h = spec.moe_intermediate_size, spec.hidden_size
        at, elems, out = 0, 0, []
        for name, (o, n) in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            packed = o * n * fmt.bits // 8
            out.append(StoredMatrix(name, o, n, at, at + packed, elems))
            at += fmt.matrix_bytes(o, n)
            elems += o * n
        return cls(fmt, tuple(out), at)

    def matrix(self, name: str) -> StoredMatrix:
        return next(m for m in self.matrices if m.name == name)

    def packed(self, store: torch.Tensor, m: StoredMatrix) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed [..., out, in * bits / 8] uint8, scales [..., out, groups] fp16) views of matrix `m` in a
        store of experts [..., nbytes]."""
        row = m.in_features * self.fmt.bits // 8
        groups = self.fmt.groups_per_row(m.in_features)
        lead = store.shape[:-1]
        packed = store[..., m.packed_at:m.packed_at + m.out_features * row].view(*lead, m.out_features, row)
        scales = store[..., m.scales_at:m.scales_at + 2 * m.out_features * groups].view(torch.float16)
        return packed, scales.view(*lead, m.out_features, groups)

    def store_matrix(self, expert: torch.Tensor, m: StoredMatrix, w: torch.Tensor) -> None:
        """Quantize W [out, in] into matrix `m` of one expert's bytes [nbytes]."""
        packed, scales = quantize(w, self.fmt)
        dst_packed, dst_scales = self.packed(expert, m)
        dst_packed.copy_(packed)
        dst_scales.copy_(scales)


def dequantize_experts(store: torch.Tensor, layout: ExpertLayout, out: torch.Tensor) -> torch.Tensor:
    """Experts stored quantized [n, nbytes] -> out [n, 3 I H] in out's dtype (gate | up | down flat), in
    chunks of at most DEQUANT_CHUNK_ELEMS weights (whole rows; whole experts where they are smaller)."""
    n = store.shape[0]
    for m in layout.matrices:
        packed, scales = layout.packed(store, m)                               # [n, out, row], [n, out, G]
        dst = out[:, m.elems_at:m.elems_at + m.out_features * m.in_features].view(n, m.out_features, m.in_features)
        rows = max(1, DEQUANT_CHUNK_ELEMS // m.in_features)
        if rows >= m.out_features:                                             # several experts per chunk
            step = rows // m.out_features
            for a in range(0, n, step):
                dequantize(packed[a:a + step], scales[a:a + step], layout.fmt, out=dst[a:a + step])
        else:
            for e in range(n):
                for r in range(0, m.out_features, rows):
                    dequantize(packed[e, r:r + rows], scales[e, r:r + rows], layout.fmt, out=dst[e, r:r + rows])
    return out


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


class DequantWorkspace:
    """The device tensor [E, 3 I H] (compute dtype) a layer's quantized experts are dequantized into before
    its MoE runs, the ExpertTable over it (one store: no host sync on any MoE path), and which table it
    holds now (`holder`: None unless the last call may be reused, see DequantTable.materialize)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
        from .moe import ExpertTable, expert_elems, expert_view

        self.tensor = torch.empty(spec.num_experts, expert_elems(spec), dtype=dtype, device=device)
        self.table = ExpertTable([expert_view(self.tensor[e], spec) for e in range(spec.num_experts)],
                                 ((0, self.tensor),))
        self.holder = None


class DequantTable:
    """A layer's experts as the pipeline reads them when they are stored quantized: its stores (first
    expert id, packed [n, bytes]: resident slots, the streamed buffer) and the shared workspace.
    runtime.moe.moe calls `materialize` first and runs on the ExpertTable it returns."""

    __slots__ = ("stores", "layout", "workspace")

    def __init__(self, stores: tuple[tuple[int, torch.Tensor], ...], layout: ExpertLayout,
                 workspace: DequantWorkspace):
        self.stores, self.layout, self.workspace = stores, layout, workspace

    def materialize(self, reuse: bool = False):
        """Dequantize the layer into the workspace (unless `reuse` and it already holds this table: the
        layer's experts are the same values whenever its pages have landed) -> the workspace's table.
        Without `reuse` (a pass with CUDA graphs, whose replays write the workspace unseen) it always
        dequantizes and leaves the workspace held by no table."""
        ws = self.workspace
        if not (reuse and ws.holder is self):
            for first, store in self.stores:
                dequantize_experts(store, self.layout, ws.tensor[first:first + store.shape[0]])
        ws.holder = self if reuse else None
        return ws.table
