"""Model and workload descriptions: what the cost model and the runtime need to know of an MoE LLM.

`ModelSpec` uses Hugging Face field names where one exists (hidden_size, num_hidden_layers, ...).
Sizes are counts of elements; bytes come from `DTypes` (floats, so int4 = 0.5 byte).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np


class SpecError(ValueError):
    """A config or workload that cannot be described: the message names the field."""


DTYPE_BYTES = {"float32": 4.0, "fp32": 4.0, "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "bf16": 2.0,
               "float8": 1.0, "fp8": 1.0, "float8_e4m3fn": 1.0, "int8": 1.0, "int4": 0.5, "mxfp4": 0.53125}


@dataclass(frozen=True)
class DTypes:
    """Bytes per element of each tensor class.

    name: the dtype the model computes in (activations; a quantized model's torch_dtype).
    weight_bytes: a non-expert weight (attention, shared and dense FFNs, routers, norms, embeddings).
    expert_weight_bytes: a routed expert's weight; None: the same as weight_bytes. Quantized formats
    differ here: gpt-oss keeps attention in bf16 and stores its experts in MXFP4 (4.25 bits).
    Sizes of a quantized format include its scales (and zeros). The embeddings and norms, which every
    format read here leaves in the compute dtype, are priced at weight_bytes too: for DeepSeek-V3 in
    fp8 that prices its 1.85 G embedding parameters at one byte instead of two.
    quantization: how the weights (or the KV cache) are stored where that is not the compute dtype
    ("" when they are): the runtime refuses such a spec unless all it names is `expert_format`.
    expert_format: the hrm.formats name the routed experts are stored in where that is a quantized one
    the runtime stores (int8, int4; set by --expert-dtype), "" otherwise.
    kv_format: likewise the KV cache's scaled 8-bit format (int8, fp8; set by --kv-dtype, ModelSpec.with_kv_format);
    kv_bytes then includes its scales.
    """
    weight_bytes: float = 2.0
    kv_bytes: float = 2.0
    act_bytes: float = 2.0
    name: str = "bfloat16"
    expert_weight_bytes: float | None = None
    quantization: str = ""
    expert_format: str = ""
    kv_format: str = ""          # the scaled hrm.formats KV format the runtime stores (int8, fp8), "" otherwise

    def __post_init__(self):
        if self.expert_weight_bytes is None:
            object.__setattr__(self, "expert_weight_bytes", self.weight_bytes)

    @classmethod
    def named(cls, name: str) -> "DTypes":
        if name not in DTYPE_BYTES:
            raise SpecError(f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
        b = DTYPE_BYTES[name]
        return cls(weight_bytes=b, kv_bytes=b, act_bytes=b, name=name)

    def stored_as(self, weight: str | None = None, kv: str | None = None) -> "DTypes":
        """What-if: every weight (experts included) stored as `weight`, the KV cache as `kv` (names of
        DTYPE_BYTES: int4 is the bare 4 bits, mxfp4 includes its scales); the compute dtype stays.
        A storage other than the compute dtype is named in `quantization`, as the flag that set it."""
        for flag, v in (("--weight-dtype", weight), ("--kv-dtype", kv)):
            if v is not None and v not in DTYPE_BYTES:
                raise SpecError(f"{flag}: unknown dtype {v!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
        same = lambda v: _CANONICAL.get(v, v) == _CANONICAL.get(self.name, self.name)   # noqa: E731
        notes = [self.quantization] if self.quantization and weight is None else []
        wb, eb = self.weight_bytes, self.expert_weight_bytes
        if weight is not None:
            wb = eb = DTYPE_BYTES[weight]
            notes += [] if same(weight) else [f"--weight-dtype {weight}"]
        if kv is not None:
            notes += [] if same(kv) else [f"--kv-dtype {kv}"]
        return DTypes(weight_bytes=wb, kv_bytes=self.kv_bytes if kv is None else DTYPE_BYTES[kv],
                      act_bytes=self.act_bytes, name=self.name, expert_weight_bytes=eb,
                      quantization="; ".join(notes), expert_format=self.expert_format if weight is None else "",
                      kv_format=self.kv_format if kv is None else "")


_CANONICAL = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "float8_e4m3fn",
              "float8": "float8_e4m3fn"}


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")   # the kinds of RoPE the runtime computes


@dataclass(frozen=True)
class RopeParameters:
    """RoPE beyond the base frequency `ModelSpec.rope_theta`, as transformers' `rope_parameters` (or the
    legacy `rope_scaling`) define it. Fields a type does not use keep their defaults.

    linear: positions divided by `factor`. dynamic: NTK-aware base growth past max_position_embeddings
    (plain RoPE up to it). yarn: per-frequency blend of interpolation and extrapolation between the
    correction dims of `beta_fast` / `beta_slow` rotations over `original_max_position_embeddings`, cos and
    sin scaled by `attention_factor`. llama3: low frequencies divided by `factor`, a smooth ramp between
    `low_freq_factor` and `high_freq_factor`. `partial_rotary_factor`: the share of each head RoPE rotates.
    """
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0           # llama3
    high_freq_factor: float = 4.0          # llama3
    beta_fast: float = 32.0                # yarn
    beta_slow: float = 1.0                 # yarn
    truncate: bool = True                  # yarn: correction range rounded outwards to whole dims
    attention_factor: float = 1.0          # yarn: cos and sin multiplied by it
    partial_rotary_factor: float = 1.0


FULL_WIDTH_QK_NORM = ("olmoe", "flex_olmo", "minimax_m2")
"""Families whose q_norm / k_norm run over the whole projection, not per head."""
EXPERT_BIASES = ("gpt_oss",)
"""Families whose routed experts (gate, up, down) and router carry biases."""
ROUTER_SCORE_BIAS = ("ernie4_5_moe", "afmoe", "laguna")
"""Families whose router's score-correction bias is a parameter (one per expert and MoE layer); DeepSeek-V3's,
GLM's and EXAONE's are buffers."""
LAYER_NORM_WITHOUT_BIAS = ("dbrx", "cohere2_moe")
"""Families with norm = "layer" whose LayerNorms have no bias."""
NORMS_PER_LAYER = {"cohere2_moe": 1, "kolibri1": 4, "afmoe": 4, "beam": 4}
"""Norms over the hidden width per layer where a family has other than two (before attention and before the
FFN): Cohere's parallel block has one, Kolibri adds one after each."""
MOE_OUTPUT_NORM = ("axk1",)
"""Families whose MoE block ends in a norm over the hidden width (its MoE layers only, not the dense ones)."""
ATTENTION_GATE = {"afmoe": "elementwise", "laguna": "per_head", "beam": "elementwise",
                  "qwen3_next": "elementwise", "qwen3_5_moe_text": "elementwise", "qwen3_5_moe": "elementwise",
                  "bailing_hybrid": "per_head"}
"""Families whose attention output is gated by a projection of the layer input: one gate per output
element ([q_dim, hidden]) or per head ([heads, hidden])."""
ATTENTION_GATE_HEAD_BIAS = ("beam",)
"""Families whose attention gate adds a bias per head."""
ATTENTION_GATE_IN_Q = ("qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe")
"""Families whose elementwise gate is the second half of q_proj (so q's bias covers it too)."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only MoE transformer.

    Attention kinds: "gqa" (MHA is gqa with num_key_value_heads == num_attention_heads) and "mla"
    (DeepSeek multi-head latent attention: the KV cache holds kv_lora_rank + qk_rope_head_dim per token).
    """
    name: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int                       # routed experts per MoE layer
    num_experts_per_tok: int               # top-k
    moe_intermediate_size: int             # width of one routed expert
    shared_expert_intermediate_size: int = 0   # total width of the shared expert(s), 0 if none
    shared_expert_gate: bool = False       # Qwen2-MoE: sigmoid gate on the shared expert output
    first_dense_layers: int = 0            # DeepSeek first_k_dense_replace: leading layers with a dense FFN
    dense_intermediate_size: int = 0       # width of those dense FFNs
    attention: str = "gqa"                 # "gqa" | "mla"
    q_lora_rank: int = 0                   # MLA
    kv_lora_rank: int = 0                  # MLA
    qk_rope_head_dim: int = 0              # MLA
    qk_nope_head_dim: int = 0              # MLA
    v_head_dim: int = 0                    # MLA (0: same as head_dim)
    index_topk: int = 0                    # DeepSeek sparse attention: keys each query attends to (0: all)
    index_n_heads: int = 0                 # ... its indexer's heads,
    index_head_dim: int = 0                # ... their width (one indexer key cached per token and layer)
    sliding_window: int = 0                # 0: none
    num_sliding_layers: int = 0            # layers that use the sliding window (gpt-oss alternates)
    num_linear_layers: int = 0             # layers of linear attention (gated delta rule) instead of softmax
    linear_num_key_heads: int = 0          # ... their key (and query) heads,
    linear_num_value_heads: int = 0        # ... value heads,
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0            # ... and the width of their causal convolution over q|k|v
    linear_attention: str = "gated_delta"  # their kind: "gated_delta" (Qwen3-Next) | "lightning" (MiniMax)
    #                                        | "kda" (Kimi delta attention: per-channel forget gates) | "mamba2"
    #                                        (key heads and dim: its B/C groups and d_state; value: heads, d_head)
    linear_gate_rank: int = 0              # kda: the rank of its forget and output gates (0: full)
    attention_sinks: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    lm_head_bias: bool = False
    qk_norm: bool = False
    norm: str = "rms"                      # "rms" | "layer"
    router: str = "softmax"                # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_groups: int = 1                 # DeepSeek n_group: top-k within the router_groups_kept best groups
    router_groups_kept: int = 1            # ... topk_group
    rope_interleave: bool = False          # RoPE rotates interleaved pairs (DeepSeek), not the two halves
    softmax_scale: float = 0.0             # attention's scale where not 1/sqrt(q-k head dim) (DeepSeek's yarn mscale)
    sliding_layers: tuple[int, ...] = ()   # which layers attend within sliding_window (where the reader knows)
    swiglu_limit: float = 0.0              # gpt-oss: gate and up clamped to it, glu = gate * sigmoid(alpha gate)
    swiglu_alpha: float = 0.0
    hidden_act: str = "silu"               # the FFNs' activation (config hidden_act; gpt-oss has its own)
    clip_qkv: float = 0.0                  # DBRX
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_parameters: RopeParameters | None = None   # None: plain RoPE over the whole head
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    dtypes: DTypes = field(default_factory=DTypes)

    # ---- derived sizes (elements) -------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_dense_layers

    @property
    def q_dim(self) -> int:
        """Width of the query projection output."""
        if self.attention == "mla":
            return self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        return self.num_attention_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Dims of a q/k head that RoPE rotates (MLA: the rope part; else partial_rotary_factor of the head)."""
        frac = self.rope_parameters.partial_rotary_factor if self.rope_parameters else 1.0
        return self.qk_rope_head_dim if self.attention == "mla" else int(self.head_dim * frac)

    @property
    def attn_v_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def kv_elems_per_token_layer(self) -> float:
        """Elements of KV cache one token holds in one layer (with sparse attention, its indexer key too), on
        average over the layers: linear-attention layers hold none (they keep a fixed state instead)."""
        per_softmax_layer = self.attended_kv_elems_per_token_layer + self.index_head_dim
        if not self.num_linear_layers:
            return per_softmax_layer
        return per_softmax_layer * (1 - self.linear_layer_frac)

    @property
    def linear_layer_frac(self) -> float:
        return self.num_linear_layers / self.num_hidden_layers

    @property
    def sliding_frac(self) -> float:
        """The share of the softmax-attention layers (all but the linear ones) that attend within the window."""
        return self.num_sliding_layers / (self.num_hidden_layers - self.num_linear_layers)

    @property
    def linear_conv_dim(self) -> int:
        """Channels of a linear-attention layer's causal convolution: its q, k and v."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_attention_params_per_layer(self) -> int:
        """A gated-delta-rule layer (Qwen3-Next): q|k|v|z and the per-head b|a from the hidden state, the
        convolution over q|k|v (no bias), per value head its decay A and dt bias, the gated RMSNorm over a
        value head, and the output projection. A lightning-attention layer (MiniMax): q|k|v, an RMSNorm
        over the heads' output, a sigmoid output gate from the hidden state and the output projection. A
        Kimi-delta-attention layer: q|k|v with their convolution, a per-channel forget gate (decay A per head,
        dt bias per channel, its projection of rank linear_gate_rank), beta per head, an output gate of the
        same rank, the RMSNorm over a head and the output projection."""
        h, nv, dv = self.hidden_size, self.linear_num_value_heads, self.linear_value_head_dim
        if self.linear_attention == "lightning":
            return h * self.linear_conv_dim + nv * dv * (2 * h + 1)
        if self.linear_attention == "mamba2":    # z|x|B|C|dt, the convolution over x|B|C (with its bias),
            width = nv * dv                      # dt bias, A and D per head, the gated norm, the output
            return (h * (self.linear_conv_dim + width + nv) + self.linear_conv_dim * (self.linear_conv_kernel + 1)
                    + 3 * nv + width + width * h)
        if self.linear_attention == "kda":       # q|k|v and their convolution, forget (A, dt, f) and output
            r, width = self.linear_gate_rank, nv * dv   # (g) gates, beta per head, norm, output projection
            gate = r * (h + width) if r else h * width
            return (h * self.linear_conv_dim + self.linear_conv_dim * self.linear_conv_kernel + width + nv
                    + 2 * gate + h * nv + dv + width * h)
        qkvz = self.linear_conv_dim + nv * dv
        return h * qkvz + h * 2 * nv + self.linear_conv_dim * self.linear_conv_kernel + 2 * nv + dv + nv * dv * h

    def linear_state_bytes_per_sequence(self) -> float:
        """The fixed state a sequence keeps in each linear-attention layer, all such layers: the recurrent
        state per value head [key dim, value dim] in fp32 (as the gated-delta-rule kernels keep it), and the
        convolution's last kernel - 1 inputs in the compute dtype."""
        if not self.num_linear_layers:
            return 0.0
        recurrent = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * 4.0
        conv = self.linear_conv_dim * max(0, self.linear_conv_kernel - 1) * self.dtypes.act_bytes
        return self.num_linear_layers * (recurrent + conv)

    @property
    def attended_kv_elems_per_token_layer(self) -> int:
        """Elements of one token's cache entry that attention reads (the latent, or K and V)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    @property
    def indexer_params_per_layer(self) -> int:
        """DeepSeek sparse attention's indexer: query heads from the q latent, one key and a weight per head
        from the hidden state, a LayerNorm (weight and bias) on the key."""
        if not self.index_topk:
            return 0
        n, d = self.index_n_heads, self.index_head_dim
        return n * d * self.q_lora_rank + d * self.hidden_size + 2 * d + n * self.hidden_size

    @property
    def kv_bytes_per_token(self) -> float:
        """KV bytes per token over all layers."""
        return self.kv_elems_per_token_layer * self.num_hidden_layers * self.dtypes.kv_bytes

    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.attention == "mla":
            qh = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank * self.num_attention_heads * qh
            else:
                q = h * self.num_attention_heads * qh
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * self.num_attention_heads * (self.qk_nope_head_dim + self.attn_v_head_dim)
            o = self.num_attention_heads * self.attn_v_head_dim * h
            return q + kv_a + kv_b + o
        qkv = h * (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        o = self.num_attention_heads * self.head_dim * h
        return qkv + o

    @property
    def expert_params(self) -> int:
        """One routed expert: gate, up and down projections (SwiGLU), and their biases where the family has
        them (gpt-oss)."""
        h, i = self.hidden_size, self.moe_intermediate_size
        return 3 * h * i + (2 * i + h if self.model_type in EXPERT_BIASES else 0)

    @property
    def expert_bytes(self) -> float:
        return self.expert_params * self.dtypes.expert_weight_bytes

    @property
    def shared_expert_params(self) -> int:
        gate = self.hidden_size if self.shared_expert_gate else 0
        return 3 * self.hidden_size * self.shared_expert_intermediate_size + gate

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def routed_expert_params_per_moe_layer(self) -> int:
        return self.num_experts * self.expert_params

    @property
    def qk_norm_elems(self) -> tuple[int, int]:
        """Elements of the q and k norm weights of one layer: per head (Qwen3), over the whole projection
        (OLMoE, FULL_WIDTH_QK_NORM), or none."""
        if not self.qk_norm:
            return 0, 0
        if self.model_type in FULL_WIDTH_QK_NORM:
            return self.q_dim, self.num_key_value_heads * self.head_dim
        return self.head_dim, self.head_dim

    @property
    def attention_small_params_per_layer(self) -> int:
        """What a layer's attention holds beside its projections: q/k/v and o biases, q/k norms, MLA's
        latent norms, the sinks (one per head), an output gate (ATTENTION_GATE)."""
        n = sum(self.qk_norm_elems) + (self.num_attention_heads if self.attention_sinks else 0)
        gate = ATTENTION_GATE.get(self.model_type)
        if gate:
            n += self.hidden_size * (self.q_dim if gate == "elementwise" else self.num_attention_heads)
            n += self.num_attention_heads if self.model_type in ATTENTION_GATE_HEAD_BIAS else 0
        if self.attention == "mla":
            return n + self.kv_lora_rank + self.q_lora_rank
        if self.qkv_bias:
            n += self.q_dim + 2 * self.num_key_value_heads * self.head_dim
            n += self.q_dim if self.model_type in ATTENTION_GATE_IN_Q else 0
        return n + (self.hidden_size if self.o_proj_bias else 0)

    @property
    def norm_params(self) -> int:
        """One of the layer norms over the hidden width: a weight, and a bias for LayerNorm (most families)."""
        biased = self.norm == "layer" and self.model_type not in LAYER_NORM_WITHOUT_BIAS
        return self.hidden_size * (2 if biased else 1)

    @property
    def non_expert_params(self) -> int:
        """Everything except routed experts: embeddings (and the LM head's bias), attention with its biases,
        norms and sinks, the routers (with their bias), shared and dense FFNs."""
        h = self.hidden_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        head_bias = self.vocab_size if self.lm_head_bias else 0
        norms = NORMS_PER_LAYER.get(self.model_type, 2) * self.norm_params
        softmax = self.attention_params_per_layer + self.attention_small_params_per_layer
        per_layer = norms + self.indexer_params_per_layer
        layers = (self.num_hidden_layers * per_layer + (self.num_hidden_layers - self.num_linear_layers) * softmax
                  + self.num_linear_layers * self.linear_attention_params_per_layer)
        router = self.router_params + (self.num_experts if self.model_type in EXPERT_BIASES + ROUTER_SCORE_BIAS else 0)
        moe_norm = self.norm_params if self.model_type in MOE_OUTPUT_NORM else 0
        moe = self.num_moe_layers * (router + self.shared_expert_params + moe_norm)
        dense = self.first_dense_layers * self.dense_ffn_params
        return embed + head_bias + self.norm_params + layers + moe + dense

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.num_moe_layers * self.routed_expert_params_per_moe_layer

    @property
    def active_params_per_token(self) -> int:
        return self.non_expert_params + self.num_moe_layers * self.num_experts_per_tok * self.expert_params

    @property
    def weight_bytes(self) -> float:
        """All weights: the non-expert ones and the routed experts, each at its own bytes per element."""
        return (self.non_expert_params * self.dtypes.weight_bytes
                + self.num_moe_layers * self.num_experts * self.expert_bytes)

    def with_dtypes(self, dtypes: DTypes) -> "ModelSpec":
        return replace(self, dtypes=dtypes)

    def with_expert_format(self, name: str) -> "ModelSpec":
        """What-if: the routed experts stored in hrm.formats' `name` (bf16, int8, int4), their scales
        included; every other weight as it was. Named in `quantization` as the flag that sets it."""
        from .formats import expert_format
        try:
            fmt = expert_format(name)
            h, i = self.hidden_size, self.moe_intermediate_size
            per_weight = (2 * fmt.matrix_bytes(i, h) + fmt.matrix_bytes(h, i)) / (3 * h * i)
        except ValueError as e:
            raise SpecError(f"--expert-dtype: {e}") from None
        notes = [n for n in self.dtypes.quantization.split("; ") if n and not n.startswith("--expert-dtype")]
        if per_weight != self.dtypes.weight_bytes or notes:
            notes.append(f"--expert-dtype {name}")
        return replace(self, dtypes=replace(self.dtypes, expert_weight_bytes=per_weight,
                                            quantization="; ".join(notes),
                                            expert_format=name if fmt.scaled else ""))

    def with_kv_format(self, name: str) -> "ModelSpec":
        """The KV cache stored in hrm.formats' KV format `name` (bf16, fp16, fp32, int8, fp8), its scales
        included in kv_bytes (one per token and kv head: per head_dim values; MLA: per latent entry). Named
        in `quantization` as the flag that sets it where it is not the compute dtype."""
        from .formats import kv_format
        try:
            fmt = kv_format(name)
        except ValueError as e:
            raise SpecError(f"--kv-dtype: {e}") from None
        width = self.attended_kv_elems_per_token_layer if self.attention == "mla" else self.head_dim
        notes = [n for n in self.dtypes.quantization.split("; ") if n and not n.startswith("--kv-dtype")]
        if _CANONICAL.get(name, name) != _CANONICAL.get(self.dtypes.name, self.dtypes.name):
            notes.append(f"--kv-dtype {name}")
        return replace(self, dtypes=replace(self.dtypes, kv_bytes=fmt.bytes_per_elem(width),
                                            quantization="; ".join(notes), kv_format=name if fmt.scaled else ""))

    def with_layers(self, num_hidden_layers: int) -> "ModelSpec":
        """The same architecture with fewer (or more) layers: for runs on hosts too small for the model."""
        if num_hidden_layers <= self.first_dense_layers:
            raise SpecError(f"num_hidden_layers={num_hidden_layers} leaves no MoE layer "
                            f"(first_dense_layers={self.first_dense_layers})")
        return replace(self, num_hidden_layers=num_hidden_layers,
                       name=f"{self.name}[{num_hidden_layers}L]")



@dataclass(frozen=True)
class Workload:
    """What is asked of the model: prompts with an average and a maximum length, each continued by
    gen_len generated tokens.

    padded: every sequence is padded to the longest prompt (the paper's MTBench setting); packed
    (padded=False): sequences keep their own lengths, and the cost model uses the average.
    """
    avg_prompt_len: float
    max_prompt_len: int
    gen_len: int
    padded: bool = False

    def __post_init__(self):
        if self.avg_prompt_len <= 0 or self.max_prompt_len <= 0:
            raise SpecError(f"prompt length must be positive, got avg={self.avg_prompt_len} "
                            f"max={self.max_prompt_len}")
        if self.avg_prompt_len > self.max_prompt_len:
            raise SpecError(f"average prompt length {self.avg_prompt_len} exceeds the maximum "
                            f"{self.max_prompt_len}")
        if self.gen_len <= 0:
            raise SpecError(f"gen_len must be positive, got {self.gen_len}")

    @classmethod
    def uniform(cls, prompt_len: int, gen_len: int, padded: bool = False) -> "Workload":
        return cls(float(prompt_len), int(prompt_len), int(gen_len), padded)

    @classmethod
    def from_prompt_lens(cls, prompt_lens: Sequence[int], gen_len: int, padded: bool = False) -> "Workload":
        if len(prompt_lens) == 0:
            raise SpecError("workload has no prompts")
        return cls(float(np.mean(prompt_lens)), int(max(prompt_lens)), int(gen_len), padded)

    @property
    def prompt_len(self) -> float:
        """Prompt tokens per sequence the hardware processes: the max when padded, else the average."""
        return float(self.max_prompt_len) if self.padded else float(self.avg_prompt_len)

    @property
    def max_context_len(self) -> int:
        return self.max_prompt_len + self.gen_len
