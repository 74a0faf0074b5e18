"""Routed experts and the shared expert of an MoE layer, and the three paths of the routed experts.

Routed experts are read through an `ExpertLookup` (expert id -> ExpertWeights) so that a page table can
place them anywhere; through an `ExpertTable` (the pipeline's page-table view, resident and streamed
experts alike) the layer also sees the stores they live in. The three paths have the same math: the
sparse one (tokens grouped per expert; one host synchronisation for the per-expert counts, a Python loop
over the experts: the slow, obvious oracle) and two sync-free ones through an ExpertTable: for at most
MOE_DENSE_MAX_TOKENS tokens a dense one that runs every expert of the layer on every token with batched
matmuls over the expert dimension and combines them with a dense [tokens, experts] routing matrix; above
that a grouped one (tokens sorted per expert on the device, torch._grouped_mm with device-side group
offsets, in slices of moe_grouped_slice_tokens(spec) tokens), where torch has a fused grouped GEMM for the device
and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hrm.policy import MOE_DENSE_MAX_TOKENS, moe_grouped_slice_tokens
from hrm.spec import ModelSpec

from .families import FP32_ROUTER
from .precision import acc_dtype
from .swiglu_kernel import silu_mul_weighted


@dataclass(frozen=True)
class SharedExpertWeights:
    gate: torch.Tensor                     # [shared, hidden]
    up: torch.Tensor                       # [shared, hidden]
    down: torch.Tensor                     # [hidden, shared]
    gate_weight: torch.Tensor | None       # [1, hidden]: sigmoid gate (Qwen2-MoE)


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor                     # [moe_intermediate, hidden]
    up: torch.Tensor                       # [moe_intermediate, hidden]
    down: torch.Tensor                     # [hidden, moe_intermediate]
    gate_bias: torch.Tensor | None = None  # [moe_intermediate] (gpt-oss)
    up_bias: torch.Tensor | None = None    # [moe_intermediate]
    down_bias: torch.Tensor | None = None  # [hidden]


ExpertLookup = Callable[[int], ExpertWeights]

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}   # (device type, dtype) -> torch._grouped_mm works


class ExpertTable:
    """An ExpertLookup (expert id -> ExpertWeights views) that also exposes the stores the experts live in,
    as `groups`: (first expert id, flat store [n, X]) for consecutive ids first .. first + n - 1. The dense
    MoE path reads each group as [n, 2I, H] (gate | up) and [n, H, I] (down) views, without copies."""

    __slots__ = ("views", "groups", "_matrices", "_biases")

    def __init__(self, views: list[ExpertWeights], groups: tuple[tuple[int, torch.Tensor], ...]):
        self.views, self.groups = views, groups
        self._matrices = self._biases = None

    def __call__(self, expert: int) -> ExpertWeights:
        return self.views[expert]

    def matrices(self, spec: ModelSpec) -> tuple[tuple[int, torch.Tensor, torch.Tensor], ...]:
        """Per group: (first expert id, gate|up as [n, H, 2I], down as [n, I, H]): the right operands of
        x @ W.T as views of the store, built once (on the decode path each view is a dispatcher call)."""
        if self._matrices is None:
            hid, inter = spec.hidden_size, spec.moe_intermediate_size
            gi = inter * hid
            self._matrices = tuple((first, store[:, :2 * gi].view(-1, 2 * inter, hid).transpose(1, 2),
                                    store[:, 2 * gi:3 * gi].view(-1, hid, inter).transpose(1, 2))
                                   for first, store in self.groups)
        return self._matrices

    def biases(self, spec: ModelSpec) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        """Per group: (gate|up bias [n, 2I], down bias [n, H]) views of the store, or None without biases."""
        if expert_elems(spec) == 3 * spec.moe_intermediate_size * spec.hidden_size:
            return None
        if self._biases is None:
            gi, inter = spec.moe_intermediate_size * spec.hidden_size, spec.moe_intermediate_size
            self._biases = tuple((store[:, 3 * gi:3 * gi + 2 * inter], store[:, 3 * gi + 2 * inter:])
                                 for _, store in self.groups)
        return self._biases


def expert_elems(spec: ModelSpec) -> int:
    """Elements of one routed expert stored flat as gate | up | down (| gate, up and down biases where the
    family has them): spec.expert_params, the account's."""
    return spec.expert_params


def expert_view(flat: torch.Tensor, spec: ModelSpec) -> ExpertWeights:
    """Views of one expert stored flat ([expert_elems]) as gate | up | down (| biases)."""
    i, h = spec.moe_intermediate_size, spec.hidden_size
    n = i * h
    parts = (flat[:n].view(i, h), flat[n:2 * n].view(i, h), flat[2 * n:3 * n].view(h, i))
    if flat.numel() == 3 * n:
        return ExpertWeights(*parts)
    return ExpertWeights(*parts, flat[3 * n:3 * n + i], flat[3 * n + i:3 * n + 2 * i], flat[3 * n + 2 * i:])


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [tokens, hidden] -> [tokens, hidden]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def glu(gate: torch.Tensor, up: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The routed experts' activation: silu(gate) * up, or gpt-oss's clamped form (gate clamped above, up on
    both sides by swiglu_limit; (up + 1) * gate * sigmoid(alpha * gate))."""
    if not spec.swiglu_limit:
        return F.silu(gate) * up
    g, u = gate.clamp(max=spec.swiglu_limit), up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
    return (u + 1) * (g * torch.sigmoid(g * spec.swiglu_alpha))


def expert_ffn(x: torch.Tensor, w: ExpertWeights, spec: ModelSpec) -> torch.Tensor:
    """One routed expert on x [tokens, hidden] -> [tokens, hidden]."""
    return F.linear(glu(F.linear(x, w.gate, w.gate_bias), F.linear(x, w.up, w.up_bias), spec), w.down, w.down_bias)


def route(h: torch.Tensor, router: torch.Tensor, spec: ModelSpec, bias: torch.Tensor | None = None,
          score_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (softmax, or sigmoid, in the accumulation dtype) -> top-k -> renormalise when norm_topk_prob
    (always for Mixtral) -> times routed_scaling_factor. `bias` is added to the logits (gpt-oss: its top-k
    softmax is this softmax renormalised); `score_bias` (e_score_correction_bias) only to the scores that
    choose, not to the weights. With router_groups > 1 the experts are chosen within the router_groups_kept
    best groups (a group's score: its best softmax score, DeepSeek-V2; the sum of its two best biased
    sigmoid scores, V3). h [tokens, hidden] -> weights [tokens, k] (acc dtype), expert ids [tokens, k]."""
    acc = acc_dtype(h.dtype)
    if spec.model_type in FP32_ROUTER:
        h, router = h.to(acc), router.to(acc)
    logits = F.linear(h, router, bias)                                     # [tokens, experts]
    if spec.router == "sigmoid":
        scores = torch.sigmoid(logits.to(acc))
    else:
        scores = torch.softmax(logits, dim=-1, dtype=acc)                 # casts up first, in one kernel
    choice = scores if score_bias is None else scores + score_bias.to(acc)
    if spec.router_groups > 1:
        t, g = choice.shape[0], spec.router_groups
        grouped = choice.view(t, g, -1)                                    # [tokens, groups, experts / group]
        best = grouped.max(dim=-1).values if spec.router == "softmax" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
        kept = torch.topk(best, spec.router_groups_kept, dim=-1)[1]        # [tokens, kept]
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~keep[..., None], 0.0 if spec.router == "softmax" else float("-inf")).view(t, -1)
    ids = torch.topk(choice, spec.num_experts_per_tok, dim=-1)[1]
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob or spec.model_type == "mixtral":
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if spec.router == "sigmoid" else 0.0))
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids


def moe(h: torch.Tensor, layer, experts: ExpertLookup, spec: ModelSpec, host_sync_ok: bool = False,
        reuse_dequant: bool = False) -> torch.Tensor:
    """Routed experts (SwiGLU, read through `experts`) plus the shared expert of `layer` (a
    runtime.model.LayerWeights: its router and shared expert). h [tokens, hidden] -> same.
    Through an ExpertTable, up to MOE_DENSE_MAX_TOKENS tokens: the dense path, above it the grouped path
    where the device has a grouped GEMM for the dtype (neither synchronises with the host); otherwise the
    sparse path (one host synchronisation: the per-expert token counts). `host_sync_ok` (prefill, never
    captured in a graph): where the experts live in several stores (resident and streamed), the grouped
    path reads the per-store pair counts once and runs each store on its own pairs only. Experts stored
    quantized (a runtime.quant.DequantTable) are dequantized into one store first; with `reuse_dequant`
    that store is kept for the calls of the same layer that follow: a prefill layer's chunks (eager, and a
    layer's first chunk always follows another layer's), a decode visit's micro-batches where the pass
    captures no CUDA graph (replays write the workspace unseen)."""
    if hasattr(experts, "materialize"):                                    # quantized: runtime.quant
        experts = experts.materialize(reuse=reuse_dequant)
    weights, ids = route(h, layer.router, spec, layer.router_bias, layer.score_bias)   # [tokens, k]
    groups = getattr(experts, "groups", None)
    path = moe_path(h.shape[0], groups, spec, h.device, h.dtype)
    if path == "dense":
        out = _routed_dense(h, weights, ids, experts.matrices(spec), spec, experts.biases(spec))
    elif path == "grouped":
        out = _routed_grouped(h, weights, ids, experts.matrices(spec), spec, host_sync_ok, experts.biases(spec))
    else:
        out = _routed_sparse(h, weights, ids, experts, spec)
    if layer.shared is not None:
        s = layer.shared
        y = swiglu(h, s.gate, s.up, s.down).to(out.dtype)
        if s.gate_weight is not None:
            y = torch.sigmoid(F.linear(h, s.gate_weight).to(out.dtype)) * y
        out += y
    return out.to(h.dtype)


def _routed_sparse(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertLookup,
                   spec: ModelSpec) -> torch.Tensor:
    """Tokens grouped per expert; [tokens, hidden] in the accumulation dtype. Syncs on the counts."""
    t, k = h.shape[0], spec.num_experts_per_tok
    out = torch.zeros(t, h.shape[1], dtype=weights.dtype, device=h.device)  # [tokens, hidden] acc
    flat = ids.reshape(-1)                                                 # [tokens * k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=spec.num_experts).tolist()
    tok_all, slot_all = order // k, order % k
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok, slot = tok_all[start:start + n], slot_all[start:start + n]    # [n]
        start += n
        y = expert_ffn(h[tok], experts(e), spec)                          # [n, hidden]
        out.index_add_(0, tok, y.to(out.dtype) * weights[tok, slot, None])
    return out


def _routed_dense(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, matrices, spec: ModelSpec,
                  biases=None) -> torch.Tensor:
    """Every expert on every token, batched over the experts of each store group, no host sync.
    Same math as _routed_sparse: per (token, expert) the SwiGLU output in the model dtype, cast to the
    accumulation dtype, times its routing weight; unselected experts get weight 0 (an exact 0 term: the
    combination adds the same k products, in expert order for k = 2). Differences from the sparse path are
    the matmul kernels' own summation orders (bmm over all tokens vs mm over the routed subset).
    [tokens, hidden] in the accumulation dtype. `matrices`: ExpertTable.matrices. ~4 kernels per group + 5."""
    t, hid, inter = h.shape[0], spec.hidden_size, spec.moe_intermediate_size
    e_all = spec.num_experts
    dense_w = torch.zeros(t, e_all, dtype=weights.dtype, device=h.device).scatter_(1, ids, weights)  # [t, E]
    y = torch.empty(e_all, t, hid, dtype=h.dtype, device=h.device)        # [E, tokens, hidden]
    for g, (first, gate_up_t, down_t) in enumerate(matrices):              # [n, H, 2I], [n, I, H]
        gu = torch.matmul(h, gate_up_t)                                    # [n, t, 2I] (h broadcast)
        rows = y[first:first + gate_up_t.shape[0]]
        if biases is None:
            a = glu(gu[..., :inter], gu[..., inter:], spec) if spec.swiglu_limit else \
                F.silu(gu[..., :inter]).mul_(gu[..., inter:])              # [n, t, I]
            torch.matmul(a, down_t, out=rows)                              # [n, t, H]
        else:
            gu += biases[g][0][:, None, :]
            torch.baddbmm(biases[g][1][:, None, :], glu(gu[..., :inter], gu[..., inter:], spec), down_t, out=rows)
    contrib = y * dense_w.t()[:, :, None]              # [E, t, H] acc (promotion: y cast up exactly, fused)
    if h.dtype == torch.float16:   # an unselected expert overflowing to inf must not give 0 * inf = NaN
        contrib = torch.where(dense_w.t()[:, :, None] != 0, contrib, 0.0)
    return contrib.sum(dim=0)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm is a sync-free grouped GEMM for this device and dtype, and right (checked
    once on a 16 x 16 case against plain matmuls). On CUDA only Hopper and Blackwell (sm90, sm100) have
    the fused kernel: below, torch falls back to one matmul per group after copying the offsets to the
    host, which is the sparse path with a sync per expert. The CPU build's fallback is used, for tests."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok and device.type == "cuda":
            ok = torch.cuda.get_device_capability(device)[0] in (9, 10) and dtype in (torch.bfloat16,)
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(16, 16, generator=g).to(device, dtype)                  # [rows, K]
                b = torch.randn(2, 16, 16, generator=g).to(device, dtype)               # [groups, N, K]
                offs = torch.tensor([5, 16], dtype=torch.int32, device=device)
                y = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)                 # [rows, N]
                ref = torch.cat((a[:5] @ b[0].t(), a[5:] @ b[1].t()))
                ok = bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def moe_path(tokens: int, groups, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> str:
    """Which routed-expert path moe() takes: "dense" or "grouped" (no host synchronisation: what a CUDA
    graph can capture) or "sparse". `groups`: the ExpertTable's store groups, or None for a plain lookup."""
    if not groups:
        return "sparse"
    if tokens <= MOE_DENSE_MAX_TOKENS:
        return "dense"
    if grouped_mm_available(device, dtype) and _grouped_aligned(groups, spec, dtype.itemsize):
        return "grouped"
    return "sparse"


def _grouped_aligned(groups: tuple[tuple[int, torch.Tensor], ...], spec: ModelSpec, elem_bytes: int) -> bool:
    """torch._grouped_mm wants every operand's rows and base addresses on 16-byte boundaries."""
    widths = (spec.hidden_size, spec.moe_intermediate_size, 2 * spec.moe_intermediate_size * spec.hidden_size)
    return (all(w * elem_bytes % 16 == 0 for w in widths)
            and all(st.data_ptr() % 16 == 0 and st.stride(0) * elem_bytes % 16 == 0 for _, st in groups))


def _routed_grouped(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, matrices,
                    spec: ModelSpec, host_sync_ok: bool = False, biases=None) -> torch.Tensor:
    """The grouped path over slices of at most moe_grouped_slice_tokens tokens (which bound its workspace),
    each written into its rows of the output. [tokens, hidden] in the accumulation dtype. `matrices`:
    ExpertTable.matrices. With one store, or without `host_sync_ok`, no host sync at any size; with several
    stores and `host_sync_ok`, one per slice (each store then runs on its own pairs only)."""
    t = h.shape[0]
    out = torch.empty(t, spec.hidden_size, dtype=weights.dtype, device=h.device)  # [tokens, hidden] acc
    step = moe_grouped_slice_tokens(spec)
    for first in range(0, t, step):
        rows = slice(first, first + step)
        _grouped_slice(out[rows], h[rows], weights[rows], ids[rows], matrices, spec, biases, host_sync_ok)
    return out


def _expert_ffn(x: torch.Tensor, gate_up_t, down_t, offs: torch.Tensor, w: torch.Tensor, spec: ModelSpec,
                bias=None, local=None) -> torch.Tensor:
    """Pairs sorted by expert, x = h[tok] [pairs, H] with their routing weights w [pairs] (acc dtype),
    through one store's two grouped GEMMs (group ends `offs`) -> w * expert(x) [pairs, H]. The weight
    scales silu(gate) * up before the down projection (linear, so the same product). Rows beyond offs[-1]
    are neither computed nor written (uninitialised). With `bias` (the store's, ExpertTable.biases) each
    pair adds its expert's (`local`: the pair's expert within the store)."""
    inter = spec.moe_intermediate_size
    gu = torch._grouped_mm(x, gate_up_t, offs=offs)                        # [pairs, 2I]
    if bias is None and not spec.swiglu_limit:
        a = silu_mul_weighted(gu, w, inter)                                # [pairs, I]
        del gu                                                              # the peak: x, gu, a
        return torch._grouped_mm(a, down_t, offs=offs)                     # [pairs, H]
    if bias is not None:
        gu += bias[0][local]
    a = glu(gu[:, :inter], gu[:, inter:], spec).mul_(w[:, None].to(gu.dtype))
    del gu
    y = torch._grouped_mm(a, down_t, offs=offs)
    return y if bias is None else y.add_(bias[1][local] * w[:, None].to(x.dtype))


def _expert_ends(flat: torch.Tensor, num: int) -> torch.Tensor:
    """Cumulative pair counts of experts 0 .. num - 1 for expert ids `flat` (values >= num count in none),
    on the device without a host sync (bincount would sync). -> [num] int64."""
    counts = torch.zeros(num + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat.clamp(max=num), torch.ones_like(flat))
    return torch.cumsum(counts[:num], 0)


def _grouped_slice(out: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, matrices,
                   spec: ModelSpec, biases, host_sync_ok: bool) -> None:
    """One slice: every (token, slot) pair sorted by expert once, each store's experts through two grouped
    GEMMs, each pair's weighted output written back to its (token, slot) row (a permutation: no atomics),
    and the k rows of each token summed in the accumulation dtype into out [tokens, hidden]. Same math as
    _routed_sparse. One store: no sync. Several stores with `host_sync_ok`: the stores' bounds in the sorted
    order read on the host once, each store run on its own pairs (H200 2026-12-02: running every store
    over all pairs cost prefill 1.7-2.3 ms more per layer and chunk of 4,096 tokens). Several stores
    without it: each store sorts its own pairs first, runs over all rows, and writes the rows beyond its
    last offset (uninitialised) to a spare row that is never read."""
    t, k = ids.shape
    pairs = ids.numel()
    flat, w_flat = ids.reshape(-1), weights.reshape(-1)                      # [t * k]
    spare = int(len(matrices) > 1 and not host_sync_ok)
    y_rows = torch.empty(pairs + spare, h.shape[1], dtype=h.dtype, device=h.device)  # [t * k (+1), H]
    if len(matrices) == 1 or host_sync_ok:
        order = torch.argsort(flat, stable=True)                           # [t * k] by expert
        ends = _expert_ends(flat, spec.num_experts)                        # [E]
        ends_host = ends.tolist() if len(matrices) > 1 else None           # the one sync (several stores)
        for g, (first, gate_up_t, down_t) in enumerate(matrices):          # [n, H, 2I], [n, I, H]
            n = gate_up_t.shape[0]
            if ends_host is None:
                sel, offs = order, ends[first:first + n]
            else:
                start, stop = (ends_host[first - 1] if first else 0), ends_host[first + n - 1]
                if stop == start:
                    continue
                sel, offs = order[start:stop], ends[first:first + n] - start   # [pairs of this store]
            bias = None if biases is None else biases[g]
            local = None if bias is None else (flat[sel] - first).clamp(0, n - 1)
            y = _expert_ffn(h[sel // k], gate_up_t, down_t, offs.to(torch.int32), w_flat[sel], spec, bias, local)
            y_rows.index_copy_(0, sel, y)
            del y
    else:
        for g, (first, gate_up_t, down_t) in enumerate(matrices):
            n = gate_up_t.shape[0]
            local = flat - first
            inside = (local >= 0) & (local < n)                            # [t * k]
            key = torch.where(inside, local, n)
            order = torch.argsort(key, stable=True)                        # [t * k]: by expert, others last
            offs = _expert_ends(key, n).to(torch.int32)                    # [n]
            bias = None if biases is None else biases[g]
            y = _expert_ffn(h[order // k], gate_up_t, down_t, offs, w_flat[order], spec, bias,
                            None if bias is None else key[order].clamp(max=n - 1))
            y_rows.index_copy_(0, torch.where(inside[order], order, pairs), y)
            del y                                                           # before the next group's
    torch.sum(y_rows[:pairs].view(t, k, -1), dim=1, dtype=out.dtype, out=out)
