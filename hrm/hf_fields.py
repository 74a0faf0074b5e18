"""Reading a Hugging Face config.json's fields as transformers reads them: the lookup that names a missing or
malformed field, RoPE and its scaling, dtypes and quantization, and the fields every family with
transformers' standard attribute names shares (hrm.hf_families builds each family's ModelSpec fields on them)."""
from __future__ import annotations

import math

from .checks import number
from .spec import DTypes, RopeParameters, SpecError

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                     "ffn_config.moe_num_experts")


class Config:
    """A config dict whose lookups name the field and the model_type when a field is missing or malformed.

    Keys may be dotted paths into nested dicts ("ffn_config.moe_top_k")."""

    def __init__(self, raw: dict, model_type: str):
        self.raw = raw
        self.model_type = model_type

    def get(self, key: str, default=None):
        node = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or node.get(part) is None:
                return default
            node = node[part]
        return node

    def _first(self, keys, default):
        for key in keys:
            value = self.get(key)
            if value is not None:
                return key, value
        if default is None:
            also = "".join(f" (or {k!r})" for k in keys[1:])
            raise SpecError(f"{self.model_type} config: missing field {keys[0]!r}{also}")
        return keys[0], default

    def int(self, *keys: str, default: int | None = None) -> int:
        key, value = self._first(keys, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpecError(f"{self.model_type} config: field {key!r} must be a non-negative integer, "
                            f"got {value!r}")
        return number(value, f"{self.model_type} config: field {key!r}", err=SpecError, integer=True)

    def float(self, *keys: str, default: float | None = None) -> float:
        key, value = self._first(keys, default)
        return number(value, f"{self.model_type} config: field {key!r}", err=SpecError, low=-math.inf)

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise SpecError(f"{self.model_type} config: field {key!r} must be true or false, got {value!r}")
        return value


def _rope_source(c: Config) -> str:
    """The dotted key of the config's RoPE dict: the legacy `rope_scaling` first (transformers lets it
    override `rope_parameters`); in a dict nested per layer type, its full-attention entry. "" if none."""
    for key in ("rope_scaling", "rope_parameters"):
        value = c.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise SpecError(f"{c.model_type} config: field {key!r} must be an object, got {value!r}")
        nested = [k for k, v in value.items() if isinstance(v, dict)]
        if nested and not ({"rope_type", "type"} & set(value)):
            return f"{key}.{'full_attention' if 'full_attention' in nested else nested[0]}"
        return key
    return ""


def _rope(c: Config, default_theta: float, max_positions: int) -> dict:
    """rope_theta and RopeParameters (None for plain RoPE over the whole head), read as transformers'
    rope utilities read them."""
    src = _rope_source(c)
    at = (lambda field: f"{src}.{field}") if src else (lambda field: field)
    theta = c.float(at("rope_theta"), "rope_theta", default=default_theta)
    rope_type = c.get(at("rope_type"), c.get(at("type"), "default")) if src else "default"
    if not isinstance(rope_type, str):
        raise SpecError(f"{c.model_type} config: field {at('rope_type')!r} must be a name, got {rope_type!r}")
    partial = c.float(at("partial_rotary_factor"), "partial_rotary_factor", default=1.0)
    if not 0 < partial <= 1:
        raise SpecError(f"{c.model_type} config: field 'partial_rotary_factor' must be in (0, 1], got {partial!r}")
    if rope_type == "default" and partial == 1.0:
        return dict(rope_theta=theta, rope_parameters=None)

    def positive(field: str, default=None) -> float:
        value = c.float(at(field), default=default)
        if not value > 0:
            raise SpecError(f"{c.model_type} config: field {at(field)!r} must be positive, got {value!r}")
        return value

    fields: dict = dict(rope_type=rope_type, partial_rotary_factor=partial)
    if rope_type in ("linear", "dynamic", "llama3"):
        fields["factor"] = positive("factor")
    if rope_type in ("yarn", "llama3", "longrope"):   # a top-level value wins, as in transformers
        original = c.int("original_max_position_embeddings", at("original_max_position_embeddings"),
                         default=max_positions)
        fields["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        fields.update(low_freq_factor=positive("low_freq_factor"), high_freq_factor=positive("high_freq_factor"))
        if fields["high_freq_factor"] == fields["low_freq_factor"]:
            raise SpecError(f"{c.model_type} config: fields {at('low_freq_factor')!r} and "
                            f"{at('high_freq_factor')!r} must differ")
    if rope_type == "yarn":
        factor = positive("factor", default=max_positions / original)
        attention = c.get(at("attention_factor"))
        if attention is None:
            mscale, mscale_all = c.get(at("mscale")), c.get(at("mscale_all_dim"))
            attention = (_yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
                         if mscale and mscale_all else _yarn_mscale(factor))
        else:
            attention = positive("attention_factor")
        fields.update(factor=factor, attention_factor=float(attention),
                      beta_fast=c.float(at("beta_fast"), default=0.0) or 32.0,
                      beta_slow=c.float(at("beta_slow"), default=0.0) or 1.0,
                      truncate=c.bool(at("truncate"), True))
    return dict(rope_theta=theta, rope_parameters=RopeParameters(**fields))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context `scale` times the original (1 when not longer)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _dtypes(c: Config) -> DTypes:
    key = "torch_dtype" if c.get("torch_dtype") is not None else "dtype"
    name = c.get(key, "bfloat16")
    if not isinstance(name, str):
        raise SpecError(f"{c.model_type} config: field {key!r} must be a dtype name, got {name!r}")
    try:
        base = DTypes.named(name.removeprefix("torch."))
    except SpecError as e:
        raise SpecError(f"{c.model_type} config: field {key!r}: {e}") from None
    return _quantized(c, base)


QUANT_METHODS = ("awq", "bitsandbytes", "fp8", "gptq", "mxfp4")
MXFP4_BYTES = (32 * 4 + 8) / 8 / 32     # 4.25 bits: a 4-bit element, one 8-bit (E8M0) scale per 32
BNB_BLOCK = 64                          # bitsandbytes 4-bit: one absmax per 64 elements
BNB_DOUBLE_BLOCK = 256                  # double quantization: 8-bit absmax, one fp32 constant per 256


def _quantized(c: Config, base: DTypes) -> DTypes:
    """The bytes per element of `quantization_config`, scales and zeros included; the compute dtype
    (base.name, the activations, the KV cache) stays the config's torch_dtype.

    fp8: every linear layer (DeepSeek-V3: e4m3 with one fp32 scale per 128x128 block). mxfp4: the
    routed experts only (transformers' integration converts nothing else). gptq / awq: `bits` per
    element and, per `group_size` elements, an fp16 scale and a zero of `bits`. bitsandbytes: 4-bit
    (an fp32 absmax per 64, or with double quantization an 8-bit one plus an fp32 per 256 blocks) or
    8-bit. `modules_to_not_convert` (bitsandbytes: `llm_int8_skip_modules`) naming the experts or the
    attention keeps those in the compute dtype; embeddings are left to weight_bytes (see DTypes)."""
    q = "quantization_config"
    raw = c.get(q)
    if raw is None:
        return base
    where = f"{c.model_type} config"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: field {q!r} must be an object, got {raw!r}")
    method = c.get(f"{q}.quant_method")
    if method is None:
        raise SpecError(f"{where}: missing field '{q}.quant_method' (known: {', '.join(QUANT_METHODS)})")
    if method not in QUANT_METHODS:
        raise SpecError(f"{where}: field '{q}.quant_method' is {method!r}, a format not read here; "
                        f"known: {', '.join(QUANT_METHODS)}")
    experts_only = False
    if method == "fp8":
        block = c.get(f"{q}.weight_block_size")
        if block is None:
            per, label = 1.0, "fp8"                 # one scale per tensor
        else:
            if (not isinstance(block, list) or len(block) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
                raise SpecError(f"{where}: field '{q}.weight_block_size' must be two positive integers, "
                                f"got {block!r}")
            per, label = 1.0 + 4.0 / (block[0] * block[1]), f"fp8 {block[0]}x{block[1]} blocks"
    elif method == "mxfp4":
        per, label, experts_only = MXFP4_BYTES, "mxfp4 experts", True
    elif method in ("gptq", "awq"):
        bits = c.int(f"{q}.bits", f"{q}.w_bit")
        if bits not in (2, 3, 4, 8):
            raise SpecError(f"{where}: field '{q}.bits' must be 2, 3, 4 or 8, got {bits!r}")
        group = c.get(f"{q}.group_size", c.get(f"{q}.q_group_size", 128))
        if isinstance(group, bool) or not isinstance(group, int) or not (group > 0 or group == -1):
            raise SpecError(f"{where}: field '{q}.group_size' must be a positive integer or -1, got {group!r}")
        zero = bits / 8 if method == "gptq" or c.bool(f"{q}.zero_point", True) else 0.0
        per = bits / 8 + ((2.0 + zero) / group if group > 0 else 0.0)   # -1: one scale per column
        label = f"{method} int{bits}" + (f" g{group}" if group > 0 else "")
    else:                                          # bitsandbytes
        if c.bool(f"{q}.load_in_4bit", False):
            double = c.bool(f"{q}.bnb_4bit_use_double_quant", False)
            scale = (1.0 + 4.0 / BNB_DOUBLE_BLOCK) / BNB_BLOCK if double else 4.0 / BNB_BLOCK
            kind = c.get(f"{q}.bnb_4bit_quant_type", "fp4")
            per, label = 0.5 + scale, f"bitsandbytes {kind}"
        elif c.bool(f"{q}.load_in_8bit", False):
            per, label = 1.0, "bitsandbytes int8"   # + an fp32 scale per row
        else:
            raise SpecError(f"{where}: field '{q}' (bitsandbytes) sets neither 'load_in_4bit' nor 'load_in_8bit'")
    skip_key = f"{q}.llm_int8_skip_modules" if method == "bitsandbytes" else f"{q}.modules_to_not_convert"
    skipped = c.get(skip_key, [])
    if not isinstance(skipped, list) or not all(isinstance(m, str) for m in skipped):
        raise SpecError(f"{where}: field {skip_key!r} must be a list of module names, got {skipped!r}")
    experts = base.weight_bytes if any("expert" in m for m in skipped) else per
    other = base.weight_bytes if experts_only or any("attn" in m for m in skipped) else per
    return DTypes(weight_bytes=other, kv_bytes=base.kv_bytes, act_bytes=base.act_bytes, name=base.name,
                  expert_weight_bytes=experts, quantization=f"{q} {label}")


def common_fields(c: Config, max_pos_key: str = "max_position_embeddings", max_pos_default: int = 4096) -> dict:
    return dict(vocab_size=c.int("vocab_size"),
                max_position_embeddings=c.int(max_pos_key, default=max_pos_default),
                tie_word_embeddings=c.bool("tie_word_embeddings", False),
                dtypes=_dtypes(c))


def standard_fields(c: Config, width_key: str, eps: float = 1e-5, theta: float = 10000.0) -> dict:
    """Fields that every family with transformers' standard attribute names shares."""
    hidden = c.int("hidden_size")
    layers = c.int("num_hidden_layers")
    heads = c.int("num_attention_heads")
    if c.get("head_dim") is None and heads and hidden % heads:
        raise SpecError(f"{c.model_type} config: missing field 'head_dim' "
                        f"(hidden_size {hidden} is not a multiple of num_attention_heads {heads})")
    common = common_fields(c)
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=c.int("num_key_value_heads", default=heads),
                head_dim=c.int("head_dim", default=hidden // heads if heads else 0),
                num_experts=c.int(*EXPERT_COUNT_KEYS),
                num_experts_per_tok=c.int("num_experts_per_tok", "experts_per_token", "num_experts_per_token", "moe_k",
                                          "moe_topk"),
                moe_intermediate_size=c.int(width_key),
                rms_norm_eps=c.float("rms_norm_eps", default=eps), hidden_act=_activation(c),
                **_rope(c, theta, common["max_position_embeddings"]), **common)


def _activation(c: Config) -> str:
    act = c.get("hidden_act", "silu")
    if not isinstance(act, str):
        raise SpecError(f"{c.model_type} config: field 'hidden_act' must be a name, got {act!r}")
    return act


def sliding_fields(c: Config, s: dict, default_layer_types: list[str] | None = None) -> dict:
    """sliding_window and num_sliding_layers; a window that covers the whole context is no window."""
    window = c.int("sliding_window", default=0)
    if not window or window >= s["max_position_embeddings"] or not c.bool("use_sliding_window", True):
        return {}
    layers = s["num_hidden_layers"]
    types = c.get("layer_types", default_layer_types)
    if types is not None:
        if len(types) != layers:
            raise SpecError(f"{c.model_type} config: field 'layer_types' has {len(types)} entries "
                            f"for {layers} layers")
        n = sum(t == "sliding_attention" for t in types)
    elif c.get("max_window_layers") is not None:
        n = max(0, layers - c.int("max_window_layers"))
    else:
        n = layers
    return dict(sliding_window=window, num_sliding_layers=n) if n else {}


def every_layer_moe(c: Config, **defaults) -> None:
    """ModelSpec describes MoE layers after first_dense_layers dense ones, not dense layers interleaved."""
    for key, default in defaults.items():
        value = c.get(key, default)
        if value != default:
            raise SpecError(f"{c.model_type} config: field {key!r}={value!r} interleaves dense and MoE layers, "
                            f"which ModelSpec cannot describe")


def mlp_only_prefix(c: Config) -> int:
    """Leading dense layers named by mlp_only_layers (Qwen-style), every later layer MoE; a dense layer after
    a MoE one is refused (ModelSpec cannot describe it)."""
    dense = c.get("mlp_only_layers") or []
    if not isinstance(dense, list) or sorted(dense) != list(range(len(dense))):
        raise SpecError(f"{c.model_type} config: field 'mlp_only_layers'={dense!r} interleaves dense and MoE "
                        f"layers, which ModelSpec cannot describe")
    every_layer_moe(c, decoder_sparse_step=1)
    return len(dense)


def attention_biases(c: Config, default: bool = False) -> dict:
    """q/k/v and o biases, all present or all absent (attention_bias)."""
    bias = c.bool("attention_bias", default)
    return dict(qkv_bias=bias, o_proj_bias=bias)


def leading_dense(c: Config, s: dict, first: int) -> dict:
    return dict(first_dense_layers=first, dense_intermediate_size=c.int("intermediate_size") if first else 0)


def dense_prefix(c: Config, layers: int) -> int:
    """Leading dense layers: from mlp_layer_types ("dense" / "sparse" per layer) where the config has it,
    else first_k_dense_replace; dense layers after a MoE one are refused (ModelSpec cannot describe them)."""
    kinds = c.get("mlp_layer_types")
    if kinds is None:
        return c.int("first_k_dense_replace", default=0)
    if not isinstance(kinds, list) or len(kinds) != layers:
        raise SpecError(f"{c.model_type} config: field 'mlp_layer_types' needs one entry per layer")
    first = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
    if any(k != "sparse" for k in kinds[first:]):
        raise SpecError(f"{c.model_type} config: field 'mlp_layer_types' interleaves dense and MoE layers, "
                        f"which ModelSpec cannot describe")
    return first
