"""Plain reference MoE transformer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss, GLM-4.5,
Hunyuan-A13B) written as layer functions.

forward(tokens) = embed -> L x [pre_attention -> causal_attention -> post_attention] -> final_logits.
The pipeline (pipeline.py) calls the same functions per layer and micro-batch; routed experts are read
through an `ExpertLookup` (expert id -> ExpertWeights) so that a page table can place them anywhere.
Norms, softmax, RoPE and the expert sum run in `acc_dtype(dtype)` (fp32, or fp64 for fp64 models).
The MoE of a layer is runtime/moe.py; MLA runtime/mla.py; windows, sinks and other scales runtime/attention.py;
leading dense layers (first_dense_layers) run a SwiGLU MLP instead of the MoE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hrm.spec import FULL_WIDTH_QK_NORM, ModelSpec

from . import attention, mla, parallel
from .families import QK_NORM_AFTER_ROPE, ROUTER_BIAS, SCORE_CORRECTION_BIAS
from .moe import ExpertLookup, SharedExpertWeights, moe, swiglu
from .precision import acc_dtype
from .rope import rope_cos_sin, rope_problem  # noqa: F401  (rope_cos_sin: the layers' RoPE tables)

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
                         "glm4_moe", "hunyuan_v1_moe")


class UnsupportedModel(ValueError):
    """A ModelSpec this runtime cannot execute (the message names the feature)."""


def check_supported(spec: ModelSpec) -> None:
    problems = []
    if spec.model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {spec.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if spec.attention not in ("gqa", "mla"):
        problems.append(f"attention {spec.attention!r}")
    if spec.attention == "mla" and (spec.qkv_bias or spec.o_proj_bias):
        problems.append("attention_bias=true with MLA (biases on q_a_proj, kv_a_proj_with_mqa, o_proj)")
    if spec.index_topk or spec.num_linear_layers:
        problems.append("sparse (indexed) or linear attention layers")
    if spec.norm != "rms":
        problems.append(f"norm {spec.norm!r}")
    if spec.router == "sigmoid" and spec.model_type not in SCORE_CORRECTION_BIAS:
        problems.append(f"router {spec.router!r} (only with a score-correction bias: {', '.join(SCORE_CORRECTION_BIAS)})")
    if spec.num_experts % spec.router_groups or spec.router_groups_kept > spec.router_groups:
        problems.append(f"n_group {spec.router_groups} / topk_group {spec.router_groups_kept} for {spec.num_experts} experts")
    if spec.sliding_window and len(spec.sliding_layers) != spec.num_sliding_layers:
        problems.append(f"sliding_window {spec.sliding_window} on layers the config does not name (layer_types)")
    if spec.lm_head_bias:
        problems.append("lm_head bias")
    if spec.hidden_act != "silu" and spec.model_type != "gpt_oss":        # gpt-oss's experts have their own
        problems.append(f"hidden_act {spec.hidden_act!r} (the FFNs are SwiGLU: silu)")
    if spec.attention == "mla" and spec.dtypes.kv_format:
        problems.append(f"--kv-dtype {spec.dtypes.kv_format} with MLA (its latent cache is stored in the compute dtype)")
    if spec.model_type in SCORE_CORRECTION_BIAS and spec.router != "sigmoid":
        problems.append(f"scoring_func {spec.router!r} ({spec.model_type}'s router is a sigmoid in transformers)")
    if spec.dtypes.expert_format and spec.model_type in ROUTER_BIAS:
        problems.append(f"--expert-dtype {spec.dtypes.expert_format} with expert biases")
    if rope_problem(spec):
        problems.append(rope_problem(spec))
    if spec.num_attention_heads % spec.num_key_value_heads:
        problems.append(f"{spec.num_attention_heads} query heads not a multiple of "
                        f"{spec.num_key_value_heads} kv heads")
    stored = [n for n in spec.dtypes.quantization.split("; ")
              if n and n not in (f"--expert-dtype {spec.dtypes.expert_format}", f"--kv-dtype {spec.dtypes.kv_format}")]
    if stored:
        problems.append(f"{'; '.join(stored)} (it stores weights and KV in bf16/fp16/fp32 only, "
                        "routed experts also in int8 and int4, the KV cache also in int8 and fp8)")
    if problems:
        raise UnsupportedModel(f"{spec.name}: runtime does not support " + "; ".join(problems))


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
    sinks: torch.Tensor | None = None      # [n_q] (gpt-oss)


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor               # [hidden]
    attn: AttentionWeights | mla.MLAWeights
    post_attention_norm: torch.Tensor      # [hidden]
    router: torch.Tensor | None            # [num_experts, hidden]; None in a leading dense layer
    shared: SharedExpertWeights | None
    router_bias: torch.Tensor | None = None    # [num_experts]: added to the logits (gpt-oss)
    score_bias: torch.Tensor | None = None     # [num_experts]: e_score_correction_bias (DeepSeek-V3, GLM)
    mlp: SharedExpertWeights | None = None     # the dense SwiGLU FFN of a leading dense layer


@dataclass(frozen=True)
class DenseWeights:
    """Every weight except the routed experts."""
    embed: torch.Tensor                    # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor                     # [hidden]
    lm_head: torch.Tensor                  # [vocab, hidden] (the embed tensor when tied)


def dense_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Our names and shapes of every non-expert tensor (the keys `dense_weights_from` reads)."""
    check_supported(spec)
    h, q, kv = spec.hidden_size, spec.q_dim, spec.num_key_value_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (spec.vocab_size, h), "norm": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, h)
    for i in range(spec.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({p + "input_norm": (h,), p + "post_attention_norm": (h,)})
        if i < spec.first_dense_layers:
            d = spec.dense_intermediate_size
            shapes.update({p + "mlp.gate": (d, h), p + "mlp.up": (d, h), p + "mlp.down": (h, d)})
        else:
            shapes[p + "router"] = (spec.num_experts, h)
            if spec.model_type in ROUTER_BIAS:
                shapes[p + "router_bias"] = (spec.num_experts,)
            if spec.model_type in SCORE_CORRECTION_BIAS:
                shapes[p + "score_bias"] = (spec.num_experts,)
        if spec.attention == "mla":
            shapes.update({p + k: v for k, v in mla.mla_shapes(spec).items()})
        else:
            shapes.update({p + "q_proj": (q, h), p + "k_proj": (kv, h), p + "v_proj": (kv, h), p + "o_proj": (h, q)})
        if spec.attention_sinks:
            shapes[p + "sinks"] = (spec.num_attention_heads,)
        if spec.qkv_bias:
            shapes.update({p + "q_bias": (q,), p + "k_bias": (kv,), p + "v_bias": (kv,)})
        if spec.o_proj_bias:
            shapes[p + "o_bias"] = (h,)
        if spec.qk_norm:
            qn, kn = spec.qk_norm_elems
            shapes[p + "q_norm"], shapes[p + "k_norm"] = (qn,), (kn,)
        s = spec.shared_expert_intermediate_size
        if s and i >= spec.first_dense_layers:
            shapes.update({p + "shared.gate": (s, h), p + "shared.up": (s, h), p + "shared.down": (h, s)})
            if spec.shared_expert_gate:
                shapes[p + "shared.gate_weight"] = (1, h)
    return shapes


def dense_weights_from(tensors: dict[str, torch.Tensor], spec: ModelSpec) -> DenseWeights:
    """Assemble DenseWeights from tensors named as in `dense_weight_shapes`."""
    def layer(i: int) -> LayerWeights:
        p = f"layers.{i}."
        get = lambda k: tensors.get(p + k)  # noqa: E731
        if spec.attention == "mla":
            attn = mla.mla_weights(get)
        else:
            attn = AttentionWeights(get("q_proj"), get("k_proj"), get("v_proj"), get("o_proj"),
                                    get("q_bias"), get("k_bias"), get("v_bias"), get("o_bias"),
                                    get("q_norm"), get("k_norm"), get("sinks"))
        shared = mlp = None
        if spec.shared_expert_intermediate_size and i >= spec.first_dense_layers:
            shared = SharedExpertWeights(get("shared.gate"), get("shared.up"), get("shared.down"),
                                         get("shared.gate_weight"))
        if i < spec.first_dense_layers:
            mlp = SharedExpertWeights(get("mlp.gate"), get("mlp.up"), get("mlp.down"), None)
        return LayerWeights(get("input_norm"), attn, get("post_attention_norm"), get("router"), shared,
                            get("router_bias"), get("score_bias"), mlp)

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
    """x [tokens, heads, d]; cos/sin [tokens, r] with r <= d: the first r dims rotate (partial rotary), the
    rest pass."""
    if cos.shape[-1] < x.shape[-1]:
        r = cos.shape[-1]
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---- layer functions -----------------------------------------------------------------------------
def pre_attention(x: torch.Tensor, layer: LayerWeights, spec: ModelSpec, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm, QKV projection (+bias), QK-norm, clip, RoPE.
    x [tokens, hidden] -> q [tokens, n_q, d], k [tokens, n_kv, d], v [tokens, n_kv, d]."""
    a = layer.attn
    t, d = x.shape[0], spec.head_dim
    h = rms_norm(x, layer.input_norm, spec.rms_norm_eps)
    if spec.attention == "mla":
        return mla.pre_attention(h, a, spec, cos, sin, rms_norm, apply_rope)
    q = F.linear(h, a.q_proj, a.q_bias)                                    # [tokens, q_dim]
    k = F.linear(h, a.k_proj, a.k_bias)                                    # [tokens, kv_dim]
    v = F.linear(h, a.v_proj, a.v_bias)
    full_width_norm = spec.model_type in FULL_WIDTH_QK_NORM
    if spec.qk_norm and full_width_norm:
        q, k = rms_norm(q, a.q_norm, spec.rms_norm_eps), rms_norm(k, a.k_norm, spec.rms_norm_eps)
    q, k, v = q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)
    per_head_norm = spec.qk_norm and not full_width_norm
    if per_head_norm and spec.model_type not in QK_NORM_AFTER_ROPE:
        q, k = rms_norm(q, a.q_norm, spec.rms_norm_eps), rms_norm(k, a.k_norm, spec.rms_norm_eps)
    if spec.clip_qkv:
        c = spec.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if per_head_norm and spec.model_type in QK_NORM_AFTER_ROPE:
        q, k = rms_norm(q, a.q_norm, spec.rms_norm_eps), rms_norm(k, a.k_norm, spec.rms_norm_eps)
    return q, k, v


def fused_qkv(a: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [q_dim + 2 kv_dim, hidden], bias or None) as views over q_proj | k_proj | v_proj when the
    store keeps them adjacent in memory (WeightStore does), else None (and for MLA). No copies."""
    if not isinstance(a, AttentionWeights):
        return None
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
    in place over q and k together (they share cos/sin), ~8 kernels instead of ~30. MLA: queries | latent
    (whose first kv_lora_rank elements are the value)."""
    if qkv is None or spec.qk_norm or spec.clip_qkv or spec.rotary_dim != spec.head_dim:
        q, k, v = pre_attention(x, layer, spec, cos, sin)
        parts = (q.flatten(1), k.flatten(1)) + (() if spec.attention == "mla" else (v.flatten(1),))
        return torch.cat(parts, dim=1, out=out)
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


def post_attention(x: torch.Tensor, attn: torch.Tensor, layer: LayerWeights, experts: ExpertLookup,
                   spec: ModelSpec, host_sync_ok: bool = False, reuse_dequant: bool = False) -> torch.Tensor:
    """O-proj + residual, RMSNorm, MoE + residual. x [tokens, hidden], attn [tokens, q_dim] -> [tokens, hidden].
    `host_sync_ok`: never captured in a CUDA graph (prefill); `reuse_dequant`: no CUDA graph in the pass at
    all; see runtime.moe.moe."""
    if spec.attention == "mla":
        x = x + mla.output(attn, layer.attn, spec)
    else:                                           # under tensor parallelism each rank's heads' share, summed
        x = x + parallel.all_reduce(F.linear(attn, layer.attn.o_proj, layer.attn.o_bias))
    h = rms_norm(x, layer.post_attention_norm, spec.rms_norm_eps)
    if layer.mlp is not None:                                              # a leading dense layer
        return x + parallel.all_reduce(swiglu(h, layer.mlp.gate, layer.mlp.up, layer.mlp.down))
    return x + parallel.all_reduce(moe(h, layer, experts, spec, host_sync_ok, reuse_dequant))


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
        la = attention.layer_attention(spec, i, getattr(layer.attn, "sinks", None))
        attn = causal_attention(q, k, v) if la is None else attention.causal(q[None], k[None], v[None], 0, la)[0]
        x = post_attention(x, attn, layer, None if layer.mlp is not None else experts_of_layer(i), spec)
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
