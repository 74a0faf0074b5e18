"""One cost formula per operator of one decoder layer, parameterised by tokens and context length.

Prefill and decode are two calls with different arguments:
  prefill of a micro-batch: tokens = mu * s, attention(seqs=mu, new_tokens=s, past_len=0)
  one decode step:          tokens = mu,     attention(seqs=mu, new_tokens=1, past_len=ctx)
Layers differ (DeepSeek's leading dense layers, gpt-oss's sliding-window layers): each formula returns
the cost averaged over the layers that have it, so `cost * num_hidden_layers` is the whole model.
`tokens` may be a numpy array.
"""
from __future__ import annotations

import numpy as np

from .cost import Cost
from .spec import ModelSpec


def _linear(spec: ModelSpec, tokens, in_features: int, out_features: int, bias: bool = False) -> Cost:
    """y[tokens, out] = x[tokens, in] @ W[in, out]."""
    act = spec.dtypes.act_bytes
    return Cost(flops=2.0 * tokens * in_features * out_features,
                weight_bytes=(in_features * out_features + (out_features if bias else 0)) * spec.dtypes.weight_bytes,
                act_bytes=tokens * (in_features + out_features) * act)


def _by_layer_kind(spec: ModelSpec, softmax: Cost, linear) -> Cost:
    """A cost averaged over the layers: softmax-attention layers cost `softmax`, linear-attention layers
    `linear()` (only evaluated where the model has them)."""
    if not spec.num_linear_layers:
        return softmax
    f = spec.linear_layer_frac
    return (1 - f) * softmax + f * linear()


def _linear_pre_attention(spec: ModelSpec, tokens) -> Cost:
    """A linear-attention layer before its recurrence: RMSNorm, its input projections (gated delta rule:
    q|k|v|z and b|a; lightning: q|k|v and the output gate; Mamba-2: z|x|B|C|dt; Kimi delta attention: q|k|v,
    the forget and output gates and beta) and the causal convolution (kernel taps per channel; none for
    lightning, whose kernel is 0)."""
    h, act = spec.hidden_size, spec.dtypes.act_bytes
    nv, dv, conv_dim = spec.linear_num_value_heads, spec.linear_value_head_dim, spec.linear_conv_dim
    norm = Cost(flops=4.0 * tokens * h, weight_bytes=h * spec.dtypes.weight_bytes, act_bytes=2.0 * tokens * h * act)
    conv = Cost(flops=2.0 * tokens * conv_dim * spec.linear_conv_kernel,
                weight_bytes=conv_dim * spec.linear_conv_kernel * spec.dtypes.weight_bytes)
    kind = spec.linear_attention
    if kind == "lightning":
        proj = _linear(spec, tokens, h, conv_dim) + _linear(spec, tokens, h, nv * dv)
    elif kind == "mamba2":
        proj = _linear(spec, tokens, h, conv_dim + nv * dv + nv)
    elif kind == "kda":
        r, width = spec.linear_gate_rank, nv * dv
        gate = (_linear(spec, tokens, h, r) + _linear(spec, tokens, r, width)) if r else _linear(spec, tokens, h, width)
        proj = _linear(spec, tokens, h, conv_dim) + 2 * gate + _linear(spec, tokens, h, nv)
    else:
        proj = _linear(spec, tokens, h, conv_dim + nv * dv) + _linear(spec, tokens, h, 2 * nv)
    return norm + proj + conv


def linear_attention(spec: ModelSpec, seqs, new_tokens) -> Cost:
    """A linear-attention layer's recurrence over `new_tokens` tokens of `seqs` sequences, every kind alike:
    per token and value head the state [key dim, value dim] decayed, updated and read by the query (about 8
    FLOPs per state element); the state read and written once per sequence and call (a decode step, or a
    prefill chunk), the FLOPs independent of the context."""
    elems = spec.linear_num_value_heads * spec.linear_key_head_dim * spec.linear_value_head_dim
    tokens = np.asarray(seqs, float) * new_tokens
    state = spec.linear_state_bytes_per_sequence() / spec.num_linear_layers
    qkv = spec.linear_conv_dim + spec.linear_num_value_heads * spec.linear_value_head_dim
    return Cost(flops=8.0 * tokens * elems, kv_bytes=2.0 * np.asarray(seqs, float) * state,
                act_bytes=tokens * qkv * spec.dtypes.act_bytes)


def pre_attention(spec: ModelSpec, tokens) -> Cost:
    """RMSNorm + QKV projection (+ QK-norm) + RoPE for `tokens` tokens (linear-attention layers: their
    projections and convolution, averaged over the layers)."""
    return _by_layer_kind(spec, _softmax_pre_attention(spec, tokens), lambda: _linear_pre_attention(spec, tokens))


def _softmax_pre_attention(spec: ModelSpec, tokens) -> Cost:
    h, act = spec.hidden_size, spec.dtypes.act_bytes
    norm = Cost(flops=4.0 * tokens * h, weight_bytes=h * spec.dtypes.weight_bytes, act_bytes=2.0 * tokens * h * act)
    if spec.attention == "mla":
        qh = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank:
            q = _linear(spec, tokens, h, spec.q_lora_rank) + _linear(spec, tokens, spec.q_lora_rank,
                                                                     spec.num_attention_heads * qh)
        else:
            q = _linear(spec, tokens, h, spec.num_attention_heads * qh)
        kv = _linear(spec, tokens, h, spec.kv_lora_rank + spec.qk_rope_head_dim)
        # absorbed MLA: each head's q_nope is projected into the latent space by its slice of W_UK
        heads = spec.num_attention_heads
        absorb = Cost(flops=2.0 * tokens * heads * spec.qk_nope_head_dim * spec.kv_lora_rank,
                      weight_bytes=heads * spec.qk_nope_head_dim * spec.kv_lora_rank * spec.dtypes.weight_bytes)
        qkv = q + kv + absorb
    else:
        out = (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim
        qkv = _linear(spec, tokens, h, out, bias=spec.qkv_bias)
    rope = Cost(flops=6.0 * tokens * spec.q_dim)
    return norm + qkv + rope + indexer_projections(spec, tokens)


def indexer_projections(spec: ModelSpec, tokens) -> Cost:
    """DeepSeek sparse attention's indexer inputs: its query heads from the q latent, its key (with a
    LayerNorm) and per-head weights from the hidden state; nothing without sparse attention."""
    if not spec.index_topk:
        return Cost()
    n, d, h = spec.index_n_heads, spec.index_head_dim, spec.hidden_size
    norm = Cost(flops=8.0 * tokens * d, weight_bytes=2 * d * spec.dtypes.weight_bytes)
    heads_q = _linear(spec, tokens, spec.q_lora_rank, n * d)
    return heads_q + _linear(spec, tokens, h, d) + _linear(spec, tokens, h, n) + norm


def _visible_keys(past_len, new_tokens):
    """(query, key) pairs of `new_tokens` causal queries after `past_len` cached keys."""
    past_len = np.asarray(past_len, dtype=float)
    return new_tokens * past_len + new_tokens * (new_tokens + 1) / 2.0


def _capped_keys(past_len, new_tokens, cap: float):
    """The same pairs when each query attends to at most `cap` keys (a window, or sparse attention's top-k):
    new token t (1-based) sees min(past + t, cap)."""
    past_len = np.asarray(past_len, dtype=float)
    full = _visible_keys(past_len, new_tokens)
    capped = np.where(past_len + new_tokens <= cap, full,
                      new_tokens * cap - np.where(past_len < cap, (cap - past_len) * (cap - past_len - 1) / 2.0, 0.0))
    return np.minimum(full, capped)


def attention_context(spec: ModelSpec, past_len, new_tokens):
    """Keys each new token attends to, summed over the new tokens and averaged over layers."""
    full = _visible_keys(past_len, new_tokens)
    if spec.index_topk:
        return _capped_keys(past_len, new_tokens, float(spec.index_topk))
    if not spec.sliding_window or not spec.num_sliding_layers:
        return full
    f = spec.sliding_frac
    return (1 - f) * full + f * _capped_keys(past_len, new_tokens, float(spec.sliding_window))


def attention(spec: ModelSpec, seqs, new_tokens, past_len) -> Cost:
    """Scaled dot-product attention of `new_tokens` new tokens per sequence over a cache of `past_len`,
    averaged over the layers (linear-attention layers: `linear_attention`).

    Decode (new_tokens = 1): Q.K and P.V cost 4 * ctx * n_q * d FLOPs against ctx * kv_elems bytes, so
    the intensity is independent of the batch (n_q / n_kv for GQA in 16-bit).
    """
    return _by_layer_kind(spec, _softmax_attention(spec, seqs, new_tokens, past_len),
                          lambda: linear_attention(spec, seqs, new_tokens))


def _softmax_attention(spec: ModelSpec, seqs, new_tokens, past_len) -> Cost:
    visits = seqs * attention_context(spec, past_len, new_tokens)      # (query, key) pairs
    if spec.attention == "mla":
        # absorbed form: scores over (kv_lora_rank + rope) latents, values over kv_lora_rank latents
        per_visit = 2.0 * spec.num_attention_heads * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim)
    else:
        per_visit = 2.0 * spec.num_attention_heads * (spec.head_dim + spec.attn_v_head_dim)
    # every cached key/value is read once per step per sequence (not per query head): the cache of
    # the whole visible context, plus the new entries written
    cached = seqs * np.minimum(np.asarray(past_len, float) + new_tokens,
                               _visible_cap(spec, past_len, new_tokens))
    kv = (cached + seqs * new_tokens) * spec.attended_kv_elems_per_token_layer * spec.dtypes.kv_bytes
    act = seqs * new_tokens * (spec.q_dim + spec.num_attention_heads * spec.attn_v_head_dim) * spec.dtypes.act_bytes
    return Cost(flops=per_visit * visits, kv_bytes=kv, act_bytes=act) + indexer_scores(spec, seqs, new_tokens, past_len)


def indexer_scores(spec: ModelSpec, seqs, new_tokens, past_len) -> Cost:
    """Sparse attention's indexer: every new token scores every visible key with each of its heads (a dot
    product, a ReLU, a weighted sum), reading each cached indexer key once and writing the new ones."""
    if not spec.index_topk:
        return Cost()
    n, d = spec.index_n_heads, spec.index_head_dim
    pairs = seqs * _visible_keys(past_len, new_tokens)
    keys = seqs * (np.asarray(past_len, float) + 2 * new_tokens)
    return Cost(flops=pairs * n * (2.0 * d + 3.0), kv_bytes=keys * d * spec.dtypes.kv_bytes)


def _visible_cap(spec: ModelSpec, past_len, new_tokens):
    """Cache entries a layer reads, averaged over sliding and full layers (sparse attention: its top-k)."""
    total = np.asarray(past_len, float) + new_tokens
    if spec.index_topk:
        return np.minimum(total, spec.index_topk)
    if not spec.sliding_window or not spec.num_sliding_layers:
        return total
    f = spec.sliding_frac
    return (1 - f) * total + f * np.minimum(total, spec.sliding_window + new_tokens - 1)


def o_proj(spec: ModelSpec, tokens) -> Cost:
    """Output projection (MLA: preceded by W_UV taking each head's latent output to v_head_dim; linear
    attention: its gated norm and output projection, averaged over the layers)."""
    def linear():
        width = spec.linear_num_value_heads * spec.linear_value_head_dim
        return _linear(spec, tokens, width, spec.hidden_size) + Cost(flops=6.0 * tokens * width)
    return _by_layer_kind(spec, _softmax_o_proj(spec, tokens), linear)


def _softmax_o_proj(spec: ModelSpec, tokens) -> Cost:
    if spec.attention == "mla":
        heads = spec.num_attention_heads
        uv = Cost(flops=2.0 * tokens * heads * spec.kv_lora_rank * spec.attn_v_head_dim,
                  weight_bytes=heads * spec.kv_lora_rank * spec.attn_v_head_dim * spec.dtypes.weight_bytes)
        return uv + _linear(spec, tokens, heads * spec.attn_v_head_dim, spec.hidden_size)
    return _linear(spec, tokens, spec.num_attention_heads * spec.attn_v_head_dim, spec.hidden_size,
                   bias=spec.o_proj_bias)


def _moe_frac(spec: ModelSpec) -> float:
    return spec.num_moe_layers / spec.num_hidden_layers


def router(spec: ModelSpec, tokens) -> Cost:
    """Post-attention RMSNorm, router logits and top-k."""
    h = spec.hidden_size
    norm = Cost(flops=4.0 * tokens * h, weight_bytes=h * spec.dtypes.weight_bytes,
                act_bytes=2.0 * tokens * h * spec.dtypes.act_bytes)
    return norm + _linear(spec, tokens, h, spec.num_experts) * _moe_frac(spec)


def expected_active_experts(spec: ModelSpec, tokens):
    """Experts that receive at least one token when `tokens` tokens route uniformly at random."""
    e, k = spec.num_experts, spec.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** np.asarray(tokens, dtype=float))


def tokens_per_expert(spec: ModelSpec, tokens):
    return np.asarray(tokens, dtype=float) * spec.num_experts_per_tok / spec.num_experts


def routed_experts(spec: ModelSpec, tokens) -> Cost:
    """All routed experts of a layer for `tokens` tokens (top-k each): weight bytes are those of the
    experts that receive a token."""
    k = spec.num_experts_per_tok
    weights = expected_active_experts(spec, tokens) * spec.expert_bytes
    c = Cost(flops=2.0 * tokens * k * spec.expert_params, weight_bytes=weights,
             act_bytes=tokens * k * (2 * spec.hidden_size + 2 * spec.moe_intermediate_size) * spec.dtypes.act_bytes)
    return c * _moe_frac(spec)


def dense_ffn(spec: ModelSpec, tokens) -> Cost:
    """Shared experts of MoE layers and the dense FFN of leading dense layers: always on the GPU."""
    h, act = spec.hidden_size, spec.dtypes.act_bytes
    shared = Cost(flops=2.0 * tokens * spec.shared_expert_params, weight_bytes=spec.shared_expert_params * spec.dtypes.weight_bytes,
                  act_bytes=tokens * (2 * h + 2 * spec.shared_expert_intermediate_size) * act)
    dense = Cost(flops=2.0 * tokens * spec.dense_ffn_params, weight_bytes=spec.dense_ffn_params * spec.dtypes.weight_bytes,
                 act_bytes=tokens * (2 * h + 2 * spec.dense_intermediate_size) * act)
    f = _moe_frac(spec)
    return shared * (f if spec.shared_expert_params else 0.0) + dense * (1 - f)


def lm_head(spec: ModelSpec, tokens) -> Cost:
    """Final norm + LM head + sampling over the vocabulary (once per step, not per layer)."""
    return _linear(spec, tokens, spec.hidden_size, spec.vocab_size, bias=spec.lm_head_bias)


def prefill_rest(spec: ModelSpec, seqs, prompt_len) -> Cost:
    """One layer's prefill of `seqs` sequences of `prompt_len` tokens without its routed experts and its dense
    FFN (shared experts, a dense layer's MLP): the attention block and the router, what the profile's prefill
    rest rate is measured over (hrm.rates.prefill_rest_flops_per_s). The dense FFN is a plain GEMM, priced
    at the GEMM rate of its tokens: inside the rest it took the rate of another model's attention."""
    tokens = np.asarray(seqs) * prompt_len
    return pre_attention(spec, tokens) + o_proj(spec, tokens) + router(spec, tokens) + attention(spec, seqs, prompt_len, 0)


def layer_gpu_ops(spec: ModelSpec, tokens) -> Cost:
    """Everything of a layer the GPU runs besides attention and the routed experts."""
    return pre_attention(spec, tokens) + o_proj(spec, tokens) + router(spec, tokens) + dense_ffn(spec, tokens)


def prefill_layer(spec: ModelSpec, seqs, prompt_len) -> Cost:
    """One layer's prefill of `seqs` sequences of `prompt_len` tokens: everything, routed experts included."""
    tokens = np.asarray(seqs) * prompt_len
    return layer_gpu_ops(spec, tokens) + attention(spec, seqs, prompt_len, 0) + routed_experts(spec, tokens)
