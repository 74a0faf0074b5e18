"""DeepSeek's multi-head latent attention (MLA) with the queries absorbed into the latent space, so that the
KV cache holds one latent entry per token and layer (kv_lora_rank normalised latent | qk_rope_head_dim
rotated key, hrm.spec.attended_kv_elems_per_token_layer) and attention over it is multi-query attention:

    q_lat[h] = W_UK[h]^T q_nope[h]          (W_UK, W_UV: kv_b_proj split per head)
    score    = scale * (q_lat[h] . c + q_pe[h] . k_pe)   == transformers' q[h] . k[h] over nope | rope
    out[h]   = W_UV[h] (sum_t p_t c_t)      then o_proj

PreAttn writes [heads, kv_lora_rank + rope] queries and the token's latent entry (its first kv_lora_rank
elements are the value); the O-projection side (`output`) maps the latent output back through W_UV. RoPE
pairs are interleaved (DeepSeek): q_pe and k_pe are permuted to halves once and stay so (the cache holds
k_pe permuted; dot products are the same)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hrm.spec import ModelSpec

from .kv_cache import KVCache


@dataclass(frozen=True)
class MLAWeights:
    kv_a_proj: torch.Tensor                  # [kv_lora_rank + rope, hidden]
    kv_a_norm: torch.Tensor                  # [kv_lora_rank]
    kv_b_proj: torch.Tensor                  # [heads * (nope + v), kv_lora_rank]
    o_proj: torch.Tensor                     # [hidden, heads * v]
    q_proj: torch.Tensor | None = None       # [heads * (nope + rope), hidden] (no q_lora_rank)
    q_a_proj: torch.Tensor | None = None     # [q_lora_rank, hidden]
    q_a_norm: torch.Tensor | None = None     # [q_lora_rank]
    q_b_proj: torch.Tensor | None = None     # [heads * (nope + rope), q_lora_rank]


MLA_HUB_NAMES = {"kv_a_proj": "kv_a_proj_with_mqa.weight", "kv_a_norm": "kv_a_layernorm.weight",
                 "kv_b_proj": "kv_b_proj.weight", "o_proj": "o_proj.weight", "q_proj": "q_proj.weight",
                 "q_a_proj": "q_a_proj.weight", "q_a_norm": "q_a_layernorm.weight", "q_b_proj": "q_b_proj.weight"}
"""Our name -> transformers' name under self_attn."""


def mla_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Our names (under layers.i.) and shapes of one MLA layer's tensors."""
    h, n, r, rope = spec.hidden_size, spec.num_attention_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
    qk = spec.qk_nope_head_dim + rope
    out = {"kv_a_proj": (r + rope, h), "kv_a_norm": (r,), "kv_b_proj": (n * (spec.qk_nope_head_dim + spec.attn_v_head_dim), r),
           "o_proj": (h, n * spec.attn_v_head_dim)}
    if spec.q_lora_rank:
        out.update(q_a_proj=(spec.q_lora_rank, h), q_a_norm=(spec.q_lora_rank,), q_b_proj=(n * qk, spec.q_lora_rank))
    else:
        out["q_proj"] = (n * qk, h)
    return out


def mla_weights(get) -> MLAWeights:
    return MLAWeights(**{name: get(name) for name in MLA_HUB_NAMES})


def interleaved_to_halves(x: torch.Tensor) -> torch.Tensor:
    """[..., d] with RoPE pairs (0, 1), (2, 3), ... -> [..., d] as evens | odds (rotate_half's layout)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _split_kv_b(a: MLAWeights, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj per head: W_UK [heads, nope, r] and W_UV [heads, v, r] (views)."""
    nope, v = spec.qk_nope_head_dim, spec.attn_v_head_dim
    w = a.kv_b_proj.view(spec.num_attention_heads, nope + v, spec.kv_lora_rank)
    return w[:, :nope], w[:, nope:]


def pre_attention(h: torch.Tensor, a: MLAWeights, spec: ModelSpec, cos: torch.Tensor, sin: torch.Tensor,
                  norm, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [tokens, hidden] (normed) -> absorbed queries [tokens, heads, r + rope], latent entry k [tokens, 1,
    r + rope] and the value v = k[..., :r] (a view). `norm`, `rope`: model.rms_norm and model.apply_rope."""
    t, n, nope, r = h.shape[0], spec.num_attention_heads, spec.qk_nope_head_dim, spec.kv_lora_rank
    if a.q_proj is not None:
        q = F.linear(h, a.q_proj)
    else:
        q = F.linear(norm(F.linear(h, a.q_a_proj), a.q_a_norm, spec.rms_norm_eps), a.q_b_proj)
    q = q.view(t, n, -1)                                                   # [tokens, heads, nope + rope]
    w_uk, _ = _split_kv_b(a, spec)
    q_lat = torch.bmm(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [tokens, heads, r]
    q_pe, latent = q[..., nope:], F.linear(h, a.kv_a_proj)                # [tokens, heads, rope], [tokens, r + rope]
    k_pe = latent[:, None, r:]
    if spec.rope_interleave:
        q_pe, k_pe = interleaved_to_halves(q_pe), interleaved_to_halves(k_pe)
    c = norm(latent[:, :r], a.kv_a_norm, spec.rms_norm_eps)
    k = torch.cat((c[:, None], rope(k_pe, cos, sin)), dim=-1)             # [tokens, 1, r + rope]
    q = torch.cat((q_lat, rope(q_pe, cos, sin)), dim=-1)                  # [tokens, heads, r + rope]
    return q, k, k[..., :r]


def output(attn: torch.Tensor, a: MLAWeights, spec: ModelSpec) -> torch.Tensor:
    """Latent attention output [tokens, heads * r] -> O-projection input through W_UV, then o_proj ->
    [tokens, hidden]."""
    t, n = attn.shape[0], spec.num_attention_heads
    _, w_uv = _split_kv_b(a, spec)                                         # [heads, v, r]
    o = torch.bmm(attn.view(t, n, -1).transpose(0, 1), w_uv.transpose(1, 2))  # [heads, tokens, v]
    return F.linear(o.transpose(0, 1).reshape(t, -1), a.o_proj)


class LatentKVCache(KVCache):
    """KVCache whose blocks hold one latent entry per slot: k [rows, 1, slots, r + rope] and v, the view of
    its first kv_lora_rank elements (the same memory). Sizes as the account's kv_cache part."""

    def carve(self, micro_batches, num_device: int) -> None:
        s = self.spec
        width = s.attended_kv_elems_per_token_layer
        need = width * s.num_hidden_layers * sum(mb.kv_slots for mb in micro_batches[num_device:])
        if need != self._host_numel:
            raise AssertionError(f"the pass lays out {need} host KV elements, the memory account {self._host_numel}")
        host = self._arena.take(need)
        offset = 0
        self._blocks, self._device_bytes = [], 0
        for _ in range(s.num_hidden_layers):
            per_mb = []
            for mb in micro_batches:
                blocks = []
                for block in mb.blocks:
                    shape = (block.size, 1, block.capacity, width)
                    if mb.index < num_device:
                        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
                        self._device_bytes += k.numel() * k.element_size()
                    else:
                        n = block.size * block.capacity * width
                        k = host[offset:offset + n].view(shape)
                        offset += n
                    blocks.append((block, k, k[..., :s.kv_lora_rank]))
                per_mb.append(tuple(blocks))
            self._blocks.append(per_mb)
