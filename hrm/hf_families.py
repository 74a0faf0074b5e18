"""The MoE families the HRM reads: per model_type, the ModelSpec fields of its config.json (hrm.hf_config's
FAMILIES). A family is one reader over hrm.hf_fields' shared fields, with its own exceptions."""
from __future__ import annotations

from .hf_fields import (Config, attention_biases, common_fields, dense_prefix, every_layer_moe, leading_dense,
                        mlp_only_prefix, sliding_fields, standard_fields)
from .hf_fields import _yarn_mscale
from .spec import SpecError

def _mixtral(c: Config) -> dict:
    s = standard_fields(c, "intermediate_size", theta=1e6)
    return dict(s, norm_topk_prob=True, **sliding_fields(c, s))


def _qwen2_moe(c: Config) -> dict:
    s = standard_fields(c, "moe_intermediate_size", eps=1e-6)
    every_layer_moe(c, decoder_sparse_step=1, mlp_only_layers=[])
    return dict(s, shared_expert_intermediate_size=c.int("shared_expert_intermediate_size"),
                shared_expert_gate=True, qkv_bias=c.bool("qkv_bias", True),
                norm_topk_prob=c.bool("norm_topk_prob", False),
                **sliding_fields(c, s))


def _qwen3_moe(c: Config) -> dict:
    s = standard_fields(c, "moe_intermediate_size", eps=1e-6)
    every_layer_moe(c, decoder_sparse_step=1, mlp_only_layers=[])
    return dict(s, qk_norm=True, **attention_biases(c),
                norm_topk_prob=c.bool("norm_topk_prob", False), **sliding_fields(c, s))


def _olmoe(c: Config) -> dict:
    s = standard_fields(c, "intermediate_size")
    return dict(s, qk_norm=True, **attention_biases(c), clip_qkv=c.float("clip_qkv", default=0.0),
                norm_topk_prob=c.bool("norm_topk_prob", False))


def _dbrx(c: Config) -> dict:
    hidden = c.int("d_model")
    heads = c.int("n_heads")
    ffn = c.raw.get("ffn_config", {})
    if not isinstance(ffn, dict):
        raise SpecError(f"{c.model_type} config: field 'ffn_config' must be an object, got {ffn!r}")
    normalize = ffn.get("moe_normalize_expert_weights", 1)      # an explicit null turns it off
    return dict(hidden_size=hidden, num_hidden_layers=c.int("n_layers"), num_attention_heads=heads,
                num_key_value_heads=c.int("attn_config.kv_n_heads", default=heads),
                head_dim=hidden // heads if heads else 0,
                num_experts=c.int("ffn_config.moe_num_experts"),
                num_experts_per_tok=c.int("ffn_config.moe_top_k"),
                moe_intermediate_size=c.int("ffn_config.ffn_hidden_size"),
                norm="layer", rms_norm_eps=1e-5, clip_qkv=c.float("attn_config.clip_qkv", default=0.0),
                norm_topk_prob=normalize is not None,
                rope_theta=c.float("attn_config.rope_theta", default=10000.0),
                **common_fields(c, "max_seq_len", 2048))


def _deepseek(c: Config, v3: bool) -> dict:
    """DeepSeek-V2 / V3 (and the families built on them). transformers' V2 router is always a softmax without
    renormalisation (scoring_func and norm_topk_prob are not read), top-k within topk_group of n_group groups
    under topk_method 'group_limited_greedy'; V3's is always grouped. RoPE rotates interleaved pairs (V3: unless
    rope_interleave is false); the softmax scale takes YaRN's mscale(mscale_all_dim) twice."""
    s = standard_fields(c, "moe_intermediate_size", eps=1e-6)
    every_layer_moe(c, moe_layer_freq=1)
    if c.bool("mlp_bias", False):
        raise SpecError(f"{c.model_type} config: mlp_bias=true (biases on the MLPs) is not priced")
    nope, rope = c.int("qk_nope_head_dim"), c.int("qk_rope_head_dim")
    first = dense_prefix(c, s["num_hidden_layers"])
    router = c.get("scoring_func", "sigmoid") if v3 else "softmax"
    if router not in ("softmax", "sigmoid"):
        raise SpecError(f"{c.model_type} config: field 'scoring_func' must be softmax or sigmoid, got {router!r}")
    grouped = v3 or c.get("topk_method", "greedy") == "group_limited_greedy"
    groups = dict(router_groups=c.int("n_group", default=1), router_groups_kept=c.int("topk_group", default=1)) \
        if grouped else {}
    s.update(head_dim=nope + rope, num_key_value_heads=s["num_attention_heads"])
    scale = 0.0
    mscale_all = c.get("rope_scaling.mscale_all_dim", c.get("rope_parameters.mscale_all_dim"))
    if s["rope_parameters"] is not None and s["rope_parameters"].rope_type != "default" and mscale_all:
        m = _yarn_mscale(s["rope_parameters"].factor, float(mscale_all))
        scale = (nope + rope) ** -0.5 * m * m
    return dict(s, attention="mla", q_lora_rank=c.int("q_lora_rank", default=0),
                kv_lora_rank=c.int("kv_lora_rank"), qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                v_head_dim=c.int("v_head_dim"), first_dense_layers=first,
                dense_intermediate_size=c.int("intermediate_size") if first else 0,
                shared_expert_intermediate_size=c.int("n_shared_experts", default=0) * s["moe_intermediate_size"],
                router=router, norm_topk_prob=c.bool("norm_topk_prob", v3) if v3 else False,
                routed_scaling_factor=c.float("routed_scaling_factor", default=1.0), **groups,
                rope_interleave=c.bool("rope_interleave", True) if v3 else True, softmax_scale=scale,
                **attention_biases(c))


def _sparse_deepseek(c: Config) -> dict:
    """DeepSeek-V3.2 (and GLM-5's DSA): V3 with sparse attention, every layer indexed: an indexer of
    index_n_heads x index_head_dim picks index_topk keys per query."""
    kinds = c.get("layer_types")
    if isinstance(kinds, list) and set(kinds) != {"indexed_attention"}:
        raise SpecError(f"{c.model_type} config: field 'layer_types' mixes indexed and other attention layers, "
                        f"which ModelSpec cannot describe")
    s = _deepseek(c, v3=True)
    if not s["q_lora_rank"]:
        raise SpecError(f"{c.model_type} config: sparse attention needs q_lora_rank > 0 "
                        f"(its indexer reads the q latent)")
    return dict(s, index_topk=c.int("index_topk"), index_n_heads=c.int("index_n_heads"),
                index_head_dim=c.int("index_head_dim"))


def _phimoe(c: Config) -> dict:
    s = standard_fields(c, "intermediate_size", theta=1e6)
    return dict(s, norm="layer", **attention_biases(c), lm_head_bias=c.bool("lm_head_bias", False),
                norm_topk_prob=False, **sliding_fields(c, s))


def _gpt_oss(c: Config) -> dict:
    s = standard_fields(c, "intermediate_size", theta=150000.0)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s["num_hidden_layers"])]
    sliding = sliding_fields(c, s, alternating)
    types = c.get("layer_types", alternating)
    if sliding:
        sliding["sliding_layers"] = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return dict(s, attention_sinks=True, **attention_biases(c, default=True), norm_topk_prob=True,
                swiglu_limit=c.float("swiglu_limit", default=7.0), swiglu_alpha=c.float("swiglu_alpha", default=1.702),
                **sliding)


def _layers_of_kind(c: Config, layers: int, kinds: tuple[str, ...] = ("linear_attention",)) -> int:
    """How many entries of layer_types (one per layer) are of `kinds`."""
    types = c.get("layer_types") or []
    if len(types) != layers:
        raise SpecError(f"{c.model_type} config: field 'layer_types' needs one entry per layer")
    return sum(k in kinds for k in types)


def _granitemoe(c: Config) -> dict:
    """GraniteMoE (and GraniteMoeShared: a shared SwiGLU MLP of shared_intermediate_size, no gate)."""
    s = standard_fields(c, "intermediate_size")
    return dict(s, **attention_biases(c), norm_topk_prob=True,
                shared_expert_intermediate_size=c.int("shared_intermediate_size", default=0))


def _granitemoehybrid(c: Config) -> dict:
    """GraniteMoE-Hybrid (Granite 4): GraniteMoE-Shared's MoE, attention layers between Mamba-2 layers
    (mamba_n_heads x mamba_d_head, B and C of mamba_n_groups x mamba_d_state, a biased convolution)."""
    s = _granitemoe(c)
    if not c.bool("mamba_conv_bias", True) or c.bool("mamba_proj_bias", False):
        raise SpecError(f"{c.model_type} config: only mamba_conv_bias=true and mamba_proj_bias=false are priced")
    mamba = _layers_of_kind(c, s["num_hidden_layers"], ("linear_attention", "mamba"))   # transformers' name, the Hub's
    return dict(s, num_linear_layers=mamba, linear_attention="mamba2",
                linear_num_key_heads=c.int("mamba_n_groups"), linear_key_head_dim=c.int("mamba_d_state"),
                linear_num_value_heads=c.int("mamba_n_heads"), linear_value_head_dim=c.int("mamba_d_head"),
                linear_conv_kernel=c.int("mamba_d_conv"))


def _granitemoe_swa(c: Config) -> dict:
    """GraniteMoE-SWA: GraniteMoE with a learnable sink per head and sliding-window layers (layer_types)."""
    s = _granitemoe(c)
    return dict(s, attention_sinks=True, **sliding_fields(c, s))


def _glm4_moe(c: Config) -> dict:
    """GLM-4.5 / 4.6: DeepSeek-V3's routing (sigmoid, score-correction bias, shared experts, leading dense
    layers) over GQA attention with a partial rotary and q/k/v biases (none on o)."""
    s = standard_fields(c, "moe_intermediate_size")
    first = dense_prefix(c, s["num_hidden_layers"])
    return dict(s, qkv_bias=c.bool("attention_bias", False), qk_norm=c.bool("use_qk_norm", False),
                shared_expert_intermediate_size=c.int("n_shared_experts", default=0) * s["moe_intermediate_size"],
                router="sigmoid", norm_topk_prob=c.bool("norm_topk_prob", True),
                router_groups=c.int("n_group", default=1), router_groups_kept=c.int("topk_group", default=1),
                routed_scaling_factor=c.float("routed_scaling_factor", default=1.0), **leading_dense(c, s, first))


def _exaone_moe(c: Config) -> dict:
    """EXAONE MoE: per-head q/k norms, shared experts, dense layers first (mlp_layer_types), sliding layers."""
    s = standard_fields(c, "moe_intermediate_size")
    return dict(s, qk_norm=True, router="sigmoid", norm_topk_prob=c.bool("norm_topk_prob", True),
                shared_expert_intermediate_size=c.int("num_shared_experts", default=0) * s["moe_intermediate_size"],
                routed_scaling_factor=c.float("routed_scaling_factor", default=1.0),
                **leading_dense(c, s, dense_prefix(c, s["num_hidden_layers"])), **sliding_fields(c, s))


def _mellum(c: Config) -> dict:
    """Mellum MoE: Qwen3's layer (per-head q/k norms), dense layers first, sliding layers."""
    s = standard_fields(c, "moe_intermediate_size")
    return dict(s, qk_norm=True, **attention_biases(c), norm_topk_prob=c.bool("norm_topk_prob", True),
                **leading_dense(c, s, dense_prefix(c, s["num_hidden_layers"])), **sliding_fields(c, s))


def _aria_text(c: Config) -> dict:
    """Aria's language model: experts as wide as intermediate_size, moe_num_shared_experts of them shared."""
    s = standard_fields(c, "intermediate_size")
    return dict(s, norm_topk_prob=True,
                shared_expert_intermediate_size=c.int("moe_num_shared_experts", default=0) * s["moe_intermediate_size"])


def _ernie4_5_moe(c: Config) -> dict:
    """ERNIE 4.5 MoE: leading dense layers (moe_layer_start_index), shared experts, a score-correction bias
    per MoE layer (a parameter, counted)."""
    c = Config({**c.raw, "num_experts_per_tok": c.raw.get("moe_k", c.raw.get("num_experts_per_tok"))}, c.model_type)
    s = standard_fields(c, "moe_intermediate_size")
    if c.bool("use_bias", False):
        raise SpecError(f"{c.model_type} config: use_bias=true (a bias on every projection) is not priced")
    first, end = c.int("moe_layer_start_index", default=0), c.get("moe_layer_end_index", -1)
    if c.int("moe_layer_interval", default=1) != 1 or end not in (-1, s["num_hidden_layers"] - 1):
        raise SpecError(f"{c.model_type} config: fields 'moe_layer_interval' / 'moe_layer_end_index' interleave "
                        f"dense and MoE layers, which ModelSpec cannot describe")
    shared = c.int("moe_num_shared_experts", default=0) * s["moe_intermediate_size"]
    return dict(s, shared_expert_intermediate_size=shared,
                norm_topk_prob=True, **leading_dense(c, s, first))


def _hunyuan_v1_moe(c: Config) -> dict:
    """Hunyuan-A13B: per-head q/k norms, a shared MLP as wide as an expert, q/k/v/o biases together."""
    topk = c.get("moe_topk", 1)                    # what transformers' Hunyuan reads, whatever else is set
    if isinstance(topk, list):
        if not topk or len(set(topk)) != 1:
            raise SpecError(f"{c.model_type} config: field 'moe_topk' varies by layer ({topk!r}), which ModelSpec "
                            f"cannot describe")
        topk = topk[0]
    c = Config({**c.raw, "num_experts_per_tok": topk}, c.model_type)
    s = standard_fields(c, "intermediate_size")
    return dict(s, qk_norm=True, **attention_biases(c), norm_topk_prob=True,
                shared_expert_intermediate_size=c.int("num_shared_expert", default=1) * s["moe_intermediate_size"])


def _cohere2_moe(c: Config) -> dict:
    """Command A MoE: attention and MoE in parallel from one LayerNorm (weight only), sliding layers, experts
    as wide as intermediate_size; dense layers first take prefix_dense_intermediate_size."""
    s = standard_fields(c, "intermediate_size", eps=c.float("layer_norm_eps", default=1e-5))
    if c.int("num_shared_experts", default=0):
        raise SpecError(f"{c.model_type} config: num_shared_experts > 0 (combined by "
                        f"{c.get('shared_expert_combination_strategy')!r}) is not priced")
    first = dense_prefix(c, s["num_hidden_layers"])
    return dict(s, norm="layer", **attention_biases(c), norm_topk_prob=c.bool("norm_topk_prob", True),
                first_dense_layers=first,
                dense_intermediate_size=c.int("prefix_dense_intermediate_size", "intermediate_size") if first else 0,
                **sliding_fields(c, s))


def _kolibri1(c: Config) -> dict:
    """Kolibri: per-head q/k norms, a norm after attention and after the FFN as well, a shared expert."""
    s = standard_fields(c, "moe_intermediate_size")
    return dict(s, qk_norm=True, norm_topk_prob=c.bool("norm_topk_prob", False),
                shared_expert_intermediate_size=c.int("shared_expert_intermediate_size", default=0),
                **sliding_fields(c, s))


def _afmoe(c: Config) -> dict:
    """AFMoE: per-head q/k norms, an elementwise gate on the attention output, four norms per layer, a bias
    per expert in the router, shared experts, leading dense layers (num_dense_layers)."""
    s = standard_fields(c, "moe_intermediate_size")
    first = c.int("num_dense_layers", default=0)
    return dict(s, qk_norm=True, router="sigmoid", norm_topk_prob=True,
                routed_scaling_factor=c.float("route_scale", default=1.0),
                shared_expert_intermediate_size=c.int("num_shared_experts", default=0) * s["moe_intermediate_size"],
                **leading_dense(c, s, first), **sliding_fields(c, s))


def _laguna(c: Config) -> dict:
    """Laguna: per-head q/k norms and output gate, a score-correction bias per expert (a parameter), a shared
    expert, leading dense layers (mlp_layer_types)."""
    heads = c.get("num_attention_heads_per_layer")
    if isinstance(heads, list) and len(set(heads)) > 1:
        raise SpecError(f"{c.model_type} config: field 'num_attention_heads_per_layer' varies by layer "
                        f"({heads!r}), which ModelSpec cannot describe")
    s = standard_fields(c, "moe_intermediate_size")
    return dict(s, qk_norm=True, router="sigmoid", norm_topk_prob=True,
                routed_scaling_factor=c.float("moe_routed_scaling_factor", default=1.0),
                shared_expert_intermediate_size=c.int("shared_expert_intermediate_size", default=0),
                **leading_dense(c, s, dense_prefix(c, s["num_hidden_layers"])), **sliding_fields(c, s))


def _dots1(c: Config) -> dict:
    """dots.llm1: DeepSeek-V3's routing (sigmoid, score-correction bias as a buffer, grouped top-k, shared
    experts, leading dense layers) over GQA attention with per-head q/k norms; sliding layers after
    max_window_layers."""
    s = standard_fields(c, "moe_intermediate_size")
    return dict(s, qk_norm=True, **attention_biases(c), router="sigmoid",
                norm_topk_prob=c.bool("norm_topk_prob", False),
                routed_scaling_factor=c.float("routed_scaling_factor", default=1.0),
                shared_expert_intermediate_size=c.int("n_shared_experts", default=0) * s["moe_intermediate_size"],
                **leading_dense(c, s, dense_prefix(c, s["num_hidden_layers"])), **sliding_fields(c, s))


def _minimax_m2(c: Config) -> dict:
    """MiniMax-M2: experts as wide as intermediate_size, a sigmoid router with a score-correction bias (a
    buffer) and normalised top-k, q/k norms over the whole projections, no biases, partial rotary."""
    s = standard_fields(c, "intermediate_size")
    return dict(s, qk_norm=True, router="sigmoid", norm_topk_prob=True)


def _qwen3_next(c: Config) -> dict:
    """Qwen3-Next and Qwen3.5-MoE (text): softmax-attention layers with an output gate from a doubled q_proj
    and q/k norms, between gated-delta-rule linear-attention layers ('linear_attention' in layer_types);
    every layer MoE with a gated shared expert."""
    s = standard_fields(c, "moe_intermediate_size", eps=1e-6)
    every_layer_moe(c, decoder_sparse_step=1, mlp_only_layers=[])
    linear = _layers_of_kind(c, s["num_hidden_layers"])
    return dict(s, qk_norm=True, **attention_biases(c), norm_topk_prob=c.bool("norm_topk_prob", True),
                shared_expert_intermediate_size=c.int("shared_expert_intermediate_size", default=0),
                shared_expert_gate=True, num_linear_layers=linear,
                linear_num_key_heads=c.int("linear_num_key_heads"), linear_num_value_heads=c.int("linear_num_value_heads"),
                linear_key_head_dim=c.int("linear_key_head_dim"), linear_value_head_dim=c.int("linear_value_head_dim"),
                linear_conv_kernel=c.int("linear_conv_kernel_dim"))


def _qwen3_5_moe(c: Config) -> dict:
    """Qwen3.5-MoE's composite config (vision and text): its causal LM is the text model, read from
    text_config as qwen3_5_moe_text."""
    text = c.get("text_config")
    if not isinstance(text, dict):
        raise SpecError(f"{c.model_type} config: field 'text_config' must be an object, got {text!r}")
    return _qwen3_next(Config(text, c.model_type))


def _lara_mini(c: Config) -> dict:
    """Lara-mini: Qwen3-Next's gated-delta-rule layers (no output gate on the softmax ones) between full and
    sliding-window attention layers, a shared expert without a gate, q/k norms."""
    s = _qwen3_next(c)
    return dict(s, shared_expert_gate=False, **sliding_fields(c, s))


def _kimi_linear(c: Config) -> dict:
    """Kimi-Linear: DeepSeek-V3's MLA layers and MoE (shared experts, leading dense layers) between Kimi delta
    attention layers (linear_num_heads x linear_head_dim, gates of rank linear_head_dim). Bailing-hybrid
    (Ling): the same with full-rank gates and a per-head output gate on its MLA layers (ATTENTION_GATE)."""
    s = _deepseek(c, v3=True)
    heads, d = c.int("linear_num_heads"), c.int("linear_head_dim")
    return dict(s, shared_expert_intermediate_size=c.int("num_shared_experts", default=0) * s["moe_intermediate_size"],
                norm_topk_prob=c.bool("moe_renormalize", True), num_linear_layers=_layers_of_kind(c, s["num_hidden_layers"]),
                linear_attention="kda", linear_num_key_heads=heads, linear_num_value_heads=heads,
                linear_key_head_dim=d, linear_value_head_dim=d, linear_conv_kernel=c.int("linear_conv_kernel_dim"),
                linear_gate_rank=d if c.model_type == "kimi_linear" else 0)


def _minimax(c: Config) -> dict:
    """MiniMax-Text-01: Mixtral's MoE, softmax-attention layers between lightning-attention ones (q|k|v of
    every head, an RMSNorm over their output, a sigmoid output gate; a [head dim, head dim] state per head)."""
    s = dict(_mixtral(c), qk_norm=False)
    heads, d = s["num_attention_heads"], s["head_dim"]
    return dict(s, num_linear_layers=_layers_of_kind(c, s["num_hidden_layers"]), linear_attention="lightning",
                linear_num_key_heads=heads, linear_num_value_heads=heads, linear_key_head_dim=d,
                linear_value_head_dim=d)


def _llama4_text(c: Config) -> dict:
    """Llama 4 (text): every layer MoE (interleave_moe_layer_step 1; Maverick's interleaved dense layers are
    refused), a shared expert as wide as the routed ones, a top-k router whose weights are the sigmoid of the
    chosen logits, L2 q/k norms (no parameters). Its 'chunked_attention' layers attend within chunks of
    attention_chunk_size tokens: priced as windows of that size, which is their bound (a context shorter than
    a chunk attends everything, as a full layer does)."""
    s = standard_fields(c, "intermediate_size", theta=500000.0)
    layers = s["num_hidden_layers"]
    every_layer_moe(c, interleave_moe_layer_step=1)
    moe_layers = c.get("moe_layers")
    if moe_layers is not None and sorted(moe_layers) != list(range(layers)):
        raise SpecError(f"{c.model_type} config: field 'moe_layers'={moe_layers!r} interleaves dense and MoE "
                        f"layers, which ModelSpec cannot describe")
    chunk = c.int("attention_chunk_size", default=0)
    chunked = _layers_of_kind(c, layers, ("chunked_attention",)) if c.get("layer_types") else 0
    window = (dict(sliding_window=chunk, num_sliding_layers=chunked)
              if chunk and chunked and chunk < s["max_position_embeddings"] else {})
    return dict(s, shared_expert_intermediate_size=c.int("intermediate_size"), router="sigmoid",
                norm_topk_prob=False, **attention_biases(c), **window)


def _hy_v3(c: Config) -> dict:
    """Hunyuan V3: per-head q/k norms, a sigmoid router with a score-correction bias (a buffer), normalised and
    scaled top-k (router_scaling_factor), shared experts, leading dense layers (mlp_layer_types)."""
    s = standard_fields(c, "moe_intermediate_size")
    if c.bool("mlp_bias", False):
        raise SpecError(f"{c.model_type} config: mlp_bias=true (biases on the MLPs) is not priced")
    return dict(s, qk_norm=True, **attention_biases(c), router="sigmoid", norm_topk_prob=True,
                routed_scaling_factor=c.float("router_scaling_factor", default=1.0),
                shared_expert_intermediate_size=c.int("num_shared_experts", default=0) * s["moe_intermediate_size"],
                **leading_dense(c, s, dense_prefix(c, s["num_hidden_layers"])))


def _flint(c: Config) -> dict:
    """Flint: per-head q/k norms, a learned sink per head, sliding layers, a sigmoid router, an ungated shared
    expert, leading dense layers (mlp_only_layers)."""
    s = standard_fields(c, "moe_intermediate_size")
    return dict(s, qk_norm=True, **attention_biases(c), attention_sinks=True, router="sigmoid",
                norm_topk_prob=c.bool("norm_topk_prob", True),
                shared_expert_intermediate_size=c.int("shared_expert_intermediate_size", default=0),
                **leading_dense(c, s, mlp_only_prefix(c)), **sliding_fields(c, s))


def _minimax_m3(c: Config) -> dict:
    """MiniMax-M3's language model: experts as wide as intermediate_size, a sigmoid router with a score-correction
    bias (a buffer), a shared expert of shared_intermediate_size, per-head q/k norms, leading dense layers of
    dense_intermediate_size (mlp_layer_types). Its block-sparse 'minimax_m3_sparse' layers are refused by kind."""
    s = standard_fields(c, "intermediate_size")
    first = dense_prefix(c, s["num_hidden_layers"])
    return dict(s, qk_norm=True, router="sigmoid", norm_topk_prob=True,
                routed_scaling_factor=c.float("routed_scaling_factor", default=1.0),
                shared_expert_intermediate_size=c.int("shared_intermediate_size", default=0),
                first_dense_layers=first, dense_intermediate_size=c.int("dense_intermediate_size") if first else 0)


def _beam(c: Config) -> dict:
    """Beam: per-head q/k norms, an elementwise sigmoid gate with a bias per head on the attention output,
    four norms per layer, a grouped sigmoid router with a score-correction bias (a buffer), leading dense
    layers (mlp_layer_types), sliding layers."""
    s = standard_fields(c, "moe_intermediate_size")
    return dict(s, qk_norm=True, **attention_biases(c), router="sigmoid",
                norm_topk_prob=c.bool("norm_topk_prob", True),
                routed_scaling_factor=c.float("routed_scaling_factor", default=1.0),
                **leading_dense(c, s, dense_prefix(c, s["num_hidden_layers"])), **sliding_fields(c, s))


FAMILIES = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "dbrx": _dbrx,
    "deepseek_v2": lambda c: _deepseek(c, v3=False),
    "deepseek_v3": lambda c: _deepseek(c, v3=True),
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
    "granitemoe": _granitemoe,
    "granitemoeshared": _granitemoe,
    "glm4_moe": _glm4_moe,
    "exaone_moe": _exaone_moe,
    "ernie4_5_moe": _ernie4_5_moe,
    "hunyuan_v1_moe": _hunyuan_v1_moe,
    "solar_open": _glm4_moe,
    "sarvam_moe": _glm4_moe,
    "glm4_moe_lite": lambda c: _deepseek(c, v3=True),
    "mellum": _mellum,
    "aria_text": _aria_text,
    "flex_olmo": _olmoe,
    "cohere2_moe": _cohere2_moe,
    "kolibri1": _kolibri1,
    "afmoe": _afmoe,
    "laguna": _laguna,
    "dots1": _dots1,
    "minimax_m2": _minimax_m2,
    "hy_v3": _hy_v3,
    "granitemoe_swa": _granitemoe_swa,
    "sarvam_mla": lambda c: _deepseek(c, v3=True),
    "axk1": lambda c: _deepseek(c, v3=True),
    "flint": _flint,
    "deepseek_v32": _sparse_deepseek,
    "glm_moe_dsa": _sparse_deepseek,
    "minimax_m3_vl_text": _minimax_m3,
    "beam": _beam,
    "llama4_text": _llama4_text,
    "qwen3_next": _qwen3_next,
    "qwen3_5_moe_text": _qwen3_next,
    "qwen3_5_moe": _qwen3_5_moe,
    "minimax": _minimax,
    "lara_mini": _lara_mini,
    "kimi_linear": _kimi_linear,
    "bailing_hybrid": _kimi_linear,
    "granitemoehybrid": _granitemoehybrid,
}

SPARSE_ATTENTION_FAMILIES = frozenset({"deepseek_v32", "glm_moe_dsa"})
"""Families whose readers price 'indexed_attention' layers (DeepSeek sparse attention)."""
CHUNKED_ATTENTION_FAMILIES = frozenset({"llama4_text"})
"""Families whose readers price 'chunked_attention' layers (as windows of the chunk)."""
LINEAR_ATTENTION_FAMILIES = frozenset({"qwen3_next", "qwen3_5_moe_text", "minimax", "lara_mini", "kimi_linear",
                                       "bailing_hybrid", "granitemoehybrid"})
"""Families whose readers price 'linear_attention' layers (ModelSpec.linear_attention names their kind)."""
MAMBA_FAMILIES = frozenset({"granitemoehybrid"})
"""Families whose readers price their Mamba layers (as linear-attention layers of kind mamba2)."""

UNPRICED_FAMILIES = {
    "doge": "its dynamic-mask attention (field 'keep_window_size') and the MoE of fields 'is_moe' and 'num_experts'",
    "gemma4_text": "its per-layer head widths (field 'per_layer_config'), per-layer input embeddings (field "
                   "'hidden_size_per_layer_input') and, with enable_moe_block, a dense MLP beside the experts",
    "jetmoe": "its attention experts (a mixture of attention heads, field 'kv_channels')",
    "lfm2_moe": "its short-convolution layers (fields 'conv_L_cache', 'conv_bias')",
    "longcat_flash": "its zero-computation experts (field 'zero_expert_num')",
    "mimo_v2_flash": "its sliding-window layers' own KV-head count and attention sinks (ModelSpec has one KV-head "
                     "count for every layer)",
}
"""MoE causal LMs of transformers the HRM does not price, by the feature it cannot describe."""
