"""Plain reference MoE transformer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) written as layer functions.

forward(tokens) = embed -> L x [pre_attention -> causal_attention -> post_attention] -> final_logits.
The pipeline (pipeline.py) calls the same functions per layer and micro-batch; routed experts are read
through an `ExpertLookup` (expert id -> ExpertWeights) so that a page table can place them anywhere.
Norms, softmax, RoPE and the expert sum run in `acc_dtype(dtype)` (fp32, or fp64 for fp64 models).

Three MoE paths with the same math: the sparse one (tokens grouped per expert; one host synchronisation
for the per-expert counts, a Python loop over the experts: the slow, obvious oracle) and two sync-free
ones for experts read through an `ExpertTable` (the pipeline's page-table view, resident and streamed
experts alike): for at most MOE_DENSE_MAX_TOKENS tokens a dense one that runs every expert of the layer
on every token with batched matmuls over the expert dimension and combines them with a dense
[tokens, experts] routing matrix; above that a grouped one (tokens sorted per expert on the device,
torch._grouped_mm with device-side group offsets, in slices of MOE_GROUPED_MAX_TOKENS tokens), where
torch has a fused grouped GEMM for the device and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hrm.policy import MOE_DENSE_MAX_TOKENS, MOE_GROUPED_MAX_TOKENS
from hrm.spec import ModelSpec

from .rope import rope_cos_sin, rope_problem  # noqa: F401  (rope_cos_sin: the layers' RoPE tables)

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FULL_WIDTH_QK_NORM = ("olmoe",)  # q_norm/k_norm over the whole projection, not per head


class UnsupportedModel(ValueError):
    """A ModelSpec this runtime cannot execute (the message names the feature)."""


def check_supported(spec: ModelSpec) -> None:
    problems = []
    if spec.model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {spec.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if spec.attention != "gqa":
        problems.append(f"attention {spec.attention!r}")
    if spec.first_dense_layers:
        problems.append("leading dense layers")
    if spec.norm != "rms":
        problems.append(f"norm {spec.norm!r}")
    if spec.router != "softmax":
        problems.append(f"router {spec.router!r}")
    if spec.sliding_window or spec.attention_sinks or spec.lm_head_bias:
        problems.append("sliding window / attention sinks / lm_head bias")
    if rope_problem(spec):
        problems.append(rope_problem(spec))
    if spec.num_attention_heads % spec.num_key_value_heads:
        problems.append(f"{spec.num_attention_heads} query heads not a multiple of "
                        f"{spec.num_key_value_heads} kv heads")
    if problems:
        raise UnsupportedModel(f"{spec.name}: runtime does not support " + "; ".join(problems))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit and fp32 models, fp64 for fp64 models."""
    return torch.promote_types(dtype, torch.float32)


# ---- weights -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionWeights:
    q_proj: torch.Tensor                   # [q_dim, hidden]
    k_proj: torch.Tensor                   # [kv_dim, hidden]
    v_proj: torch.Tensor                   # [kv_dim, hidden]
    o_proj: torch.Tensor                   # [hidden, q_dim]
    q_bias: torch.Tensor | None = None     # [q_dim]
    k_bias: torch.Tensor | None = None     # [kv_dim]
    v_bias: torch.Tensor | None = None     # [kv_dim]
    o_bias: torch.Tensor | None = None     # [hidden]
    q_norm: torch.Tensor | None = None     # [head_dim] per head, or [q_dim] (OLMoE)
    k_norm: torch.Tensor | None = None     # [head_dim] per head, or [kv_dim] (OLMoE)


@dataclass(frozen=True)
class SharedExpertWeights:
    gate: torch.Tensor                     # [shared, hidden]
    up: torch.Tensor                       # [shared, hidden]
    down: torch.Tensor                     # [hidden, shared]
    gate_weight: torch.Tensor | None       # [1, hidden]: sigmoid gate (Qwen2-MoE)


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor               # [hidden]
    attn: AttentionWeights
    post_attention_norm: torch.Tensor      # [hidden]
    router: torch.Tensor                   # [num_experts, hidden]
    shared: SharedExpertWeights | None


@dataclass(frozen=True)
class DenseWeights:
    """Every weight except the routed experts."""
    embed: torch.Tensor                    # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor                     # [hidden]
    lm_head: torch.Tensor                  # [vocab, hidden] (the embed tensor when tied)


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor                     # [moe_intermediate, hidden]
    up: torch.Tensor                       # [moe_intermediate, hidden]
    down: torch.Tensor                     # [hidden, moe_intermediate]


ExpertLookup = Callable[[int], ExpertWeights]

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}   # (device type, dtype) -> torch._grouped_mm works


class ExpertTable:
    """An ExpertLookup (expert id -> ExpertWeights views) that also exposes the stores the experts live in,
    as `groups`: (first expert id, flat store [n, X]) for consecutive ids first .. first + n - 1. The dense
    MoE path reads each group as [n, 2I, H] (gate | up) and [n, H, I] (down) views, without copies."""

    __slots__ = ("views", "groups", "_matrices")

    def __init__(self, views: list[ExpertWeights], groups: tuple[tuple[int, torch.Tensor], ...]):
        self.views, self.groups = views, groups
        self._matrices = None

    def __call__(self, expert: int) -> ExpertWeights:
        return self.views[expert]

    def matrices(self, spec: ModelSpec) -> tuple[tuple[int, torch.Tensor, torch.Tensor], ...]:
        """Per group: (first expert id, gate|up as [n, H, 2I], down as [n, I, H]): the right operands of
        x @ W.T as views of the store, built once (on the decode path each view is a dispatcher call)."""
        if self._matrices is None:
            hid, inter = spec.hidden_size, spec.moe_intermediate_size
            gi = inter * hid
            self._matrices = tuple((first, store[:, :2 * gi].view(-1, 2 * inter, hid).transpose(1, 2),
                                    store[:, 2 * gi:].view(-1, hid, inter).transpose(1, 2))
                                   for first, store in self.groups)
        return self._matrices


def expert_elems(spec: ModelSpec) -> int:
    """Elements of one routed expert stored flat as gate | up | down."""
    return 3 * spec.moe_intermediate_size * spec.hidden_size


def expert_view(flat: torch.Tensor, spec: ModelSpec) -> ExpertWeights:
    """Views of one expert stored flat ([3 * inter * hidden]) as gate | up | down."""
    i, h = spec.moe_intermediate_size, spec.hidden_size
    n = i * h
    return ExpertWeights(flat[:n].view(i, h), flat[n:2 * n].view(i, h), flat[2 * n:].view(h, i))


def dense_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Our names and shapes of every non-expert tensor (the keys `dense_weights_from` reads)."""
    check_supported(spec)
    h, q, kv = spec.hidden_size, spec.q_dim, spec.num_key_value_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (spec.vocab_size, h), "norm": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, h)
    for i in range(spec.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({p + "input_norm": (h,), p + "post_attention_norm": (h,),
                       p + "q_proj": (q, h), p + "k_proj": (kv, h), p + "v_proj": (kv, h),
                       p + "o_proj": (h, q), p + "router": (spec.num_experts, h)})
        if spec.qkv_bias:
            shapes.update({p + "q_bias": (q,), p + "k_bias": (kv,), p + "v_bias": (kv,)})
        if spec.o_proj_bias:
            shapes[p + "o_bias"] = (h,)
        if spec.qk_norm:
            full = spec.model_type in FULL_WIDTH_QK_NORM
            shapes[p + "q_norm"] = (q,) if full else (spec.head_dim,)
            shapes[p + "k_norm"] = (kv,) if full else (spec.head_dim,)
        s = spec.shared_expert_intermediate_size
        if s:
            shapes.update({p + "shared.gate": (s, h), p + "shared.up": (s, h), p + "shared.down": (h, s)})
            if spec.shared_expert_gate:
                shapes[p + "shared.gate_weight"] = (1, h)
    return shapes


def dense_weights_from(tensors: dict[str, torch.Tensor], spec: ModelSpec) -> DenseWeights:
    """Assemble DenseWeights from tensors named as in `dense_weight_shapes`."""
    def layer(i: int) -> LayerWeights:
        p = f"layers.{i}."
        get = lambda k: tensors.get(p + k)  # noqa: E731
        attn = AttentionWeights(get("q_proj"), get("k_proj"), get("v_proj"), get("o_proj"),
                                get("q_bias"), get("k_bias"), get("v_bias"), get("o_bias"),
                                get("q_norm"), get("k_norm"))
        shared = None
        if spec.shared_expert_intermediate_size:
            shared = SharedExpertWeights(get("shared.gate"), get("shared.up"), get("shared.down"),
                                         get("shared.gate_weight"))
        return LayerWeights(get("input_norm"), attn, get("post_attention_norm"), get("router"), shared)

    lm_head = tensors["embed"] if spec.tie_word_embeddings else tensors["lm_head"]
    return DenseWeights(tensors["embed"], tuple(layer(i) for i in range(spec.num_hidden_layers)),
                        tensors["norm"], lm_head)


# ---- building blocks -----------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in the accumulation dtype (HF order: weight * x.to(dtype)).
    F.rms_norm computes x * rsqrt(mean(x^2) + eps) in the accumulation dtype (opmath) and rounds once to
    x's dtype: the same as casting up, normalising and casting back, in one kernel on CUDA (no casts)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(d/2, -1) * signed_sin(sin), exactly."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """In-place RoPE, bit-identical to apply_rope (same products and sum, each rounded to x's dtype).
    x [tokens, heads, d] (may be a strided view); cos, sin_signed [tokens, d]."""
    rotated = x.roll(x.shape[-1] // 2, dims=-1).mul_(sin_signed[:, None, :])
    return x.mul_(cos[:, None, :]).add_(rotated)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, d]; cos/sin [tokens, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [tokens, hidden] -> [tokens, hidden]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


# ---- layer functions -----------------------------------------------------------------------------
def pre_attention(x: torch.Tensor, layer: LayerWeights, spec: ModelSpec, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm, QKV projection (+bias), QK-norm, clip, RoPE.
    x [tokens, hidden] -> q [tokens, n_q, d], k [tokens, n_kv, d], v [tokens, n_kv, d]."""
    a = layer.attn
    t, d = x.shape[0], spec.head_dim
    h = rms_norm(x, layer.input_norm, spec.rms_norm_eps)
    q = F.linear(h, a.q_proj, a.q_bias)                                    # [tokens, q_dim]
    k = F.linear(h, a.k_proj, a.k_bias)                                    # [tokens, kv_dim]
    v = F.linear(h, a.v_proj, a.v_bias)
    full_width_norm = spec.model_type in FULL_WIDTH_QK_NORM
    if spec.qk_norm and full_width_norm:
        q, k = rms_norm(q, a.q_norm, spec.rms_norm_eps), rms_norm(k, a.k_norm, spec.rms_norm_eps)
    q, k, v = q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)
    if spec.qk_norm and not full_width_norm:
        q, k = rms_norm(q, a.q_norm, spec.rms_norm_eps), rms_norm(k, a.k_norm, spec.rms_norm_eps)
    if spec.clip_qkv:
        c = spec.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def fused_qkv(a: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [q_dim + 2 kv_dim, hidden], bias or None) as views over q_proj | k_proj | v_proj when the
    store keeps them adjacent in memory (WeightStore does), else None. No copies."""
    def adjacent(parts):
        if any(p is None for p in parts):
            return None
        first = parts[0]
        if not all(p.is_contiguous() and p.dtype == first.dtype and p.device == first.device
                   and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for p in parts):
            return None
        offset = first.storage_offset()
        for p in parts:
            if p.storage_offset() != offset:
                return None
            offset += p.numel()
        rows = sum(p.shape[0] for p in parts)
        shape = (rows,) + tuple(first.shape[1:])
        return torch.as_strided(first, shape, first.stride(), first.storage_offset())

    weight = adjacent((a.q_proj, a.k_proj, a.v_proj))
    if weight is None:
        return None
    if a.q_bias is None and a.k_bias is None and a.v_bias is None:
        return weight, None
    bias = adjacent((a.q_bias, a.k_bias, a.v_bias))
    return None if bias is None else (weight, bias)


def pre_attention_packed(x: torch.Tensor, layer: LayerWeights, spec: ModelSpec, cos: torch.Tensor,
                         sin: torch.Tensor, sin_signed: torch.Tensor, out: torch.Tensor,
                         qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """pre_attention written into out [tokens, (n_q + 2 n_kv) d] as q | k | v (each flattened), the same
    values. With `qkv` (fused_qkv of the layer) and no QK-norm / clip: one matmul into `out`, then RoPE
    in place over q and k together (they share cos/sin), ~8 kernels instead of ~30."""
    if qkv is None or spec.qk_norm or spec.clip_qkv:
        q, k, v = pre_attention(x, layer, spec, cos, sin)
        return torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1, out=out)
    w, b = qkv
    h = rms_norm(x, layer.input_norm, spec.rms_norm_eps)
    if b is None:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(b, h, w.t(), out=out)
    d = spec.head_dim
    qk = out[:, :(spec.num_attention_heads + spec.num_key_value_heads) * d].view(x.shape[0], -1, d)
    apply_rope_(qk, cos, sin_signed)
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Prefill attention of one sequence, or of B sequences of one length, whose first `pad` slots are left
    padding (real tokens ignore them).
    q [S, n_q, d], k/v [S, n_kv, d] -> [S, n_q * d]; or q [B, S, n_q, d], k/v [B, S, n_kv, d] -> [B, S, n_q * d]."""
    if q.dim() == 3:
        return causal_attention(q[None], k[None], v[None], pad)[0]
    b, s = q.shape[:2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, heads, S, d]
    if pad == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
    else:
        i = torch.arange(s, device=q.device)
        allowed = (i[None, :] <= i[:, None]) & ((i[None, :] >= pad) | (i[:, None] < pad))  # [S, S]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, s, -1)


def route(h: torch.Tensor, router: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (accumulation dtype) -> top-k -> renormalise when norm_topk_prob (always for Mixtral).
    h [tokens, hidden] -> weights [tokens, k] (acc dtype), expert ids [tokens, k]."""
    logits = F.linear(h, router)                                           # [tokens, experts]
    probs = torch.softmax(logits, dim=-1, dtype=acc_dtype(h.dtype))       # casts up first, in one kernel
    weights, ids = torch.topk(probs, spec.num_experts_per_tok, dim=-1)
    if spec.norm_topk_prob or spec.model_type == "mixtral":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe(h: torch.Tensor, layer: LayerWeights, experts: ExpertLookup, spec: ModelSpec) -> torch.Tensor:
    """Routed experts (SwiGLU, read through `experts`) plus the shared expert. h [tokens, hidden] -> same.
    Through an ExpertTable, up to MOE_DENSE_MAX_TOKENS tokens: the dense path, above it the grouped path
    where the device has a grouped GEMM for the dtype (neither synchronises with the host); otherwise the
    sparse path (one host synchronisation: the per-expert token counts)."""
    weights, ids = route(h, layer.router, spec)                            # [tokens, k]
    groups = getattr(experts, "groups", None)
    path = moe_path(h.shape[0], groups, spec, h.device, h.dtype)
    if path == "dense":
        out = _routed_dense(h, weights, ids, experts.matrices(spec), spec)
    elif path == "grouped":
        out = _routed_grouped(h, weights, ids, experts.matrices(spec), spec)
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
        w = experts(e)
        y = swiglu(h[tok], w.gate, w.up, w.down)                           # [n, hidden]
        out.index_add_(0, tok, y.to(out.dtype) * weights[tok, slot, None])
    return out


def _routed_dense(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, matrices, spec: ModelSpec) -> torch.Tensor:
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
    for first, gate_up_t, down_t in matrices:                              # [n, H, 2I], [n, I, H]
        gu = torch.matmul(h, gate_up_t)                                    # [n, t, 2I] (h broadcast)
        a = F.silu(gu[..., :inter]).mul_(gu[..., inter:])                  # [n, t, I]
        torch.matmul(a, down_t, out=y[first:first + gate_up_t.shape[0]])   # [n, t, H]
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
                    spec: ModelSpec) -> torch.Tensor:
    """The grouped path over slices of at most MOE_GROUPED_MAX_TOKENS tokens (which bound its workspace),
    each written into its rows of the output: no host sync at any size. [tokens, hidden] in the
    accumulation dtype. `matrices`: ExpertTable.matrices."""
    t = h.shape[0]
    out = torch.zeros(t, spec.hidden_size, dtype=weights.dtype, device=h.device)  # [tokens, hidden] acc
    for first in range(0, t, MOE_GROUPED_MAX_TOKENS):
        rows = slice(first, first + MOE_GROUPED_MAX_TOKENS)
        _grouped_slice(out[rows], h[rows], weights[rows], ids[rows], matrices, spec)
    return out


def _grouped_slice(out: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, matrices,
                   spec: ModelSpec) -> None:
    """Per store group, its (token, slot) pairs sorted by expert and run through two grouped GEMMs whose
    group offsets stay on the device. Same math as _routed_sparse; pairs routed to other groups sort last,
    beyond the last offset, where the grouped GEMM neither computes nor writes, so they are masked (not
    multiplied) out. Adds into out [tokens, hidden] (accumulation dtype)."""
    k = ids.shape[1]
    inter = spec.moe_intermediate_size
    flat, w_flat = ids.reshape(-1), weights.reshape(-1)                      # [t * k]
    for first, gate_up_t, down_t in matrices:                              # [n, H, 2I], [n, I, H]
        n = gate_up_t.shape[0]
        local = flat - first
        inside = (local >= 0) & (local < n)                                # [t * k]
        key = torch.where(inside, local, n)
        order = torch.argsort(key, stable=True)                            # [t * k]: by expert, others last
        counts = torch.zeros(n + 1, dtype=torch.long, device=h.device).scatter_add_(0, key, torch.ones_like(key))
        offs = torch.cumsum(counts[:n], 0, dtype=torch.int32)              # [n] (bincount would sync)
        tok = order // k
        gu = torch._grouped_mm(h[tok], gate_up_t, offs=offs)               # [t * k, 2I]
        a = F.silu(gu[:, :inter], inplace=True).mul(gu[:, inter:])         # [t * k, I]
        del gu                                                              # the peak: h[tok], gu, a
        y = torch._grouped_mm(a, down_t, offs=offs)                        # [t * k, H]
        del a
        yw = y.to(out.dtype).mul_(w_flat[order, None])                     # [t * k, H] acc
        out.index_add_(0, tok, yw.masked_fill_(~inside[order, None], 0.0))
        del y, yw                                                           # before the next group's


def post_attention(x: torch.Tensor, attn: torch.Tensor, layer: LayerWeights, experts: ExpertLookup,
                   spec: ModelSpec) -> torch.Tensor:
    """O-proj + residual, RMSNorm, MoE + residual. x [tokens, hidden], attn [tokens, q_dim] -> [tokens, hidden]."""
    x = x + F.linear(attn, layer.attn.o_proj, layer.attn.o_bias)
    h = rms_norm(x, layer.post_attention_norm, spec.rms_norm_eps)
    return x + moe(h, layer, experts, spec)


def final_logits(x: torch.Tensor, dense: DenseWeights, spec: ModelSpec) -> torch.Tensor:
    """Final norm + LM head. x [tokens, hidden] -> logits [tokens, vocab] in the accumulation dtype."""
    h = rms_norm(x, dense.norm, spec.rms_norm_eps)
    return F.linear(h, dense.lm_head).to(acc_dtype(x.dtype))


# ---- reference forward ---------------------------------------------------------------------------
def forward(tokens: torch.Tensor, dense: DenseWeights, experts_of_layer: Callable[[int], ExpertLookup],
            spec: ModelSpec) -> torch.Tensor:
    """Full-sequence reference forward of one sequence: tokens [S] -> logits [S, vocab]."""
    x = dense.embed[tokens]                                                # [S, hidden]
    positions = torch.arange(tokens.shape[0], device=tokens.device)
    cos, sin = rope_cos_sin(positions, spec, x.dtype)
    for i, layer in enumerate(dense.layers):
        q, k, v = pre_attention(x, layer, spec, cos, sin)
        x = post_attention(x, causal_attention(q, k, v), layer, experts_of_layer(i), spec)
    return final_logits(x, dense, spec)


def greedy_generate(prompt: list[int], max_new_tokens: int, dense: DenseWeights,
                    experts_of_layer: Callable[[int], ExpertLookup], spec: ModelSpec) -> list[int]:
    """Reference greedy decode without a cache (re-runs the whole sequence per token)."""
    seq = list(prompt)
    device = dense.embed.device
    for _ in range(max_new_tokens):
        logits = forward(torch.tensor(seq, device=device), dense, experts_of_layer, spec)
        seq.append(int(logits[-1].argmax()))
    return seq[len(prompt):]
