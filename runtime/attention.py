"""Attention of the layers the plain kernels (model.causal_attention, cpu_attention.decode_attention) do not
cover: a softmax scale other than 1/sqrt(d) (MLA: the q-k head dim, YaRN's mscale), a sliding window, learned
sinks (gpt-oss: one logit per head in every softmax's denominator), a value narrower than the key and held
in the same memory (MLA's latent entry). `layer_attention` says how a layer attends (None: the plain
kernels). Prefill runs torch's SDPA (sinks through one extra key: q gets the element sink/scale, every key
a 0 there, the extra key 1 and a zero value); decode runs explicit fp32 matmuls over the cache.

Windows count slots: a sequence's slots after its left padding are its positions, so `i - j < window`
is transformers' sliding mask."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hrm.spec import ModelSpec


@dataclass(frozen=True)
class LayerAttention:
    scale: float
    window: int = 0                          # 0: every earlier slot
    sinks: torch.Tensor | None = None        # [n_q] on the device the attention runs on
    shared_kv: bool = False                  # v is a view of k's first elements (MLA)


def needs_variant(spec: ModelSpec) -> bool:
    return spec.attention == "mla" or spec.attention_sinks or bool(spec.sliding_layers) or bool(spec.softmax_scale)


def attention_scale(spec: ModelSpec) -> float:
    return spec.softmax_scale or 1.0 / math.sqrt(spec.head_dim)


def layer_attention(spec: ModelSpec, layer: int, sinks: torch.Tensor | None) -> LayerAttention | None:
    """How layer `layer` attends, or None where the plain kernels do (`sinks`: the layer's, on the device
    its attention runs on)."""
    if not needs_variant(spec):
        return None
    window = spec.sliding_window if layer in spec.sliding_layers else 0
    return LayerAttention(attention_scale(spec), window, sinks if spec.attention_sinks else None,
                          spec.attention == "mla")


MLA_PREFILL_KERNEL = "matmul"
"""How MLA's prefill attends: "matmul" (every head's queries of a sequence folded into one GEMM against its one
latent key, runtime.attention._one_kv_head_causal) or "sdpa" (torch's SDPA with GQA over one kv head, which
at MLA's head dim of kv_lora_rank + rope has no fused kernel that runs it fast)."""


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: int, la: LayerAttention) -> torch.Tensor:
    """Prefill attention as model.causal_attention (B sequences of one length, `pad` left padding slots):
    q [B, S, n_q, d], k [B, S, n_kv, d], v [B, S, n_kv, dv] -> [B, S, n_q * dv]."""
    b, s = q.shape[:2]
    i = torch.arange(s, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & ((i[None, :] >= pad) | (i[:, None] < pad))     # [S, S]
    if la.window:
        allowed &= i[:, None] - i[None, :] < la.window
    if la.shared_kv and la.sinks is None and k.shape[2] == 1 and MLA_PREFILL_KERNEL == "matmul":
        return _one_kv_head_causal(q, k[:, :, 0], v[:, :, 0], allowed, la.scale)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, heads, S, d]
    if la.sinks is not None:
        n_q, n_kv = qh.shape[1], kh.shape[1]
        extra = (la.sinks.to(q.dtype) / la.scale).view(1, n_q, 1, 1).expand(b, n_q, s, 1)
        qh = torch.cat((qh, extra), dim=-1)                                # [B, n_q, S, d + 1]
        key_sink = torch.zeros(b, n_kv, 1, kh.shape[-1] + 1, dtype=k.dtype, device=k.device)
        key_sink[..., -1] = 1
        kh = torch.cat((F.pad(kh, (0, 1)), key_sink), dim=2)               # [B, n_kv, S + 1, d + 1]
        vh = F.pad(vh, (0, 0, 0, 1))                                       # [B, n_kv, S + 1, dv]
        allowed = F.pad(allowed, (0, 1), value=True)                       # [S, S + 1]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=la.scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, s, -1)


_BMM_TO_FP32: dict[str, bool] = {}    # device type -> torch.bmm(..., out_dtype=float32) works for 16-bit inputs


def _bmm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) accumulated and returned in fp32 (at least): 16-bit inputs stay 16-bit where the
    device's GEMM can write fp32 (CUDA), else they are upcast first."""
    acc = torch.promote_types(a.dtype, torch.float32)
    if a.dtype == acc:
        return torch.bmm(a, b)
    kind = a.device.type
    if _BMM_TO_FP32.get(kind, True):
        try:
            return torch.bmm(a, b, out_dtype=acc)
        except (RuntimeError, NotImplementedError, TypeError):
            _BMM_TO_FP32[kind] = False
    return torch.bmm(a.to(acc), b.to(acc))


def _one_kv_head_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Causal attention of every query head over one shared kv head (MLA's latent): q [B, S, n_q, d],
    k [B, S, d], v [B, S, dv], allowed [S, S] -> [B, S, n_q * dv]. A sequence's n_q * S queries are the rows
    of one GEMM against its S keys: scores in fp32, softmax in fp32, probabilities in q's dtype for P @ V
    (as a fused kernel rounds them). Holds the chunk's scores [B, n_q, S, S] twice in fp32 at its peak
    (the scores and their softmax; hrm.memory.prefill_attention_scores_bytes)."""
    b, s, n_q, _ = q.shape
    rows = q.permute(0, 2, 1, 3).reshape(b, n_q * s, -1)                  # [B, n_q * S, d]
    scores = _bmm_acc(rows, k.transpose(1, 2)).view(b, n_q, s, s)          # [B, n_q, S, S]
    scores.mul_(scale).masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    del scores
    p = probs.to(q.dtype)
    del probs
    out = torch.bmm(p.view(b, n_q * s, s), v.to(q.dtype))                 # [B, n_q * S, dv]
    return out.view(b, n_q, s, -1).transpose(1, 2).reshape(b, s, -1)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_slots: int, mask: torch.Tensor,
           la: LayerAttention) -> torch.Tensor:
    """One query per sequence over its cache, as cpu_attention.decode_attention: q [B, n_q, d], k [B, n_kv, T, d],
    v [B, n_kv, T, dv], mask [B, 1, 1, >= num_slots] (the window's where the layer slides) -> [B, n_q * dv].
    Scores, softmax (with the sink) and P @ V in fp32 (at least), one rounding at the end."""
    b, n_q, d = q.shape
    n_kv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.view(b, n_kv, n_q // n_kv, d).to(acc)                           # [B, n_kv, g, d]
    scores = torch.matmul(qg, k[:, :, :num_slots].to(acc).transpose(-1, -2)) * la.scale   # [B, n_kv, g, T]
    scores.masked_fill_(~mask[..., :num_slots], float("-inf"))
    if la.sinks is not None:
        sink = la.sinks.to(acc).view(1, n_kv, n_q // n_kv, 1).expand(b, -1, -1, 1)
        p = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p, v[:, :, :num_slots].to(acc))                    # [B, n_kv, g, dv]
    return out.reshape(b, -1).to(q.dtype)


def append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
           rows: torch.Tensor, la: LayerAttention) -> None:
    """One token per sequence into its cache (k, v [B, n_kv, d] at slots [B]); a shared v is written with k."""
    k_cache[rows, :, slots] = k
    if not la.shared_kv:
        v_cache[rows, :, slots] = v
