"""Hugging Face config.json -> ModelSpec, and the built-in registry of MoE configs (hrm/configs/*.json).

Families: mixtral, qwen2_moe, qwen3_moe, olmoe, dbrx, deepseek_v2, deepseek_v3, phimoe, gpt_oss.
A null field counts as absent. Defaults for absent optional fields follow transformers' config classes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .checks import load_json, number, read_text
from .spec import DTypes, ModelSpec, RopeParameters, SpecError

CONFIG_DIR = Path(__file__).with_name("configs")

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "ffn_config.moe_num_experts")

DENSE_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi",
    "phi3", "olmo", "olmo2", "gpt2", "gpt_neox", "gptj", "falcon", "deepseek", "starcoder2", "cohere",
    "internlm2", "stablelm", "opt", "bloom", "mpt",
})


class _Config:
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


def _rope_source(c: _Config) -> str:
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


def _rope(c: _Config, default_theta: float, max_positions: int) -> dict:
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


def _dtypes(c: _Config) -> DTypes:
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


def _quantized(c: _Config, base: DTypes) -> DTypes:
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


def _common(c: _Config, max_pos_key: str = "max_position_embeddings", max_pos_default: int = 4096) -> dict:
    return dict(vocab_size=c.int("vocab_size"),
                max_position_embeddings=c.int(max_pos_key, default=max_pos_default),
                tie_word_embeddings=c.bool("tie_word_embeddings", False),
                dtypes=_dtypes(c))


def _standard(c: _Config, width_key: str, eps: float = 1e-5, theta: float = 10000.0) -> dict:
    """Fields that every family with transformers' standard attribute names shares."""
    hidden = c.int("hidden_size")
    layers = c.int("num_hidden_layers")
    heads = c.int("num_attention_heads")
    if c.get("head_dim") is None and heads and hidden % heads:
        raise SpecError(f"{c.model_type} config: missing field 'head_dim' "
                        f"(hidden_size {hidden} is not a multiple of num_attention_heads {heads})")
    common = _common(c)
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=c.int("num_key_value_heads", default=heads),
                head_dim=c.int("head_dim", default=hidden // heads if heads else 0),
                num_experts=c.int(*EXPERT_COUNT_KEYS),
                num_experts_per_tok=c.int("num_experts_per_tok", "experts_per_token"),
                moe_intermediate_size=c.int(width_key),
                rms_norm_eps=c.float("rms_norm_eps", default=eps),
                **_rope(c, theta, common["max_position_embeddings"]), **common)


def _sliding(c: _Config, s: dict, default_layer_types: list[str] | None = None) -> dict:
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


def _every_layer_moe(c: _Config, **defaults) -> None:
    """ModelSpec describes MoE layers after first_dense_layers dense ones, not dense layers interleaved."""
    for key, default in defaults.items():
        value = c.get(key, default)
        if value != default:
            raise SpecError(f"{c.model_type} config: field {key!r}={value!r} interleaves dense and MoE layers, "
                            f"which ModelSpec cannot describe")


def _mixtral(c: _Config) -> dict:
    s = _standard(c, "intermediate_size", theta=1e6)
    return dict(s, norm_topk_prob=True, **_sliding(c, s))


def _qwen2_moe(c: _Config) -> dict:
    s = _standard(c, "moe_intermediate_size", eps=1e-6)
    _every_layer_moe(c, decoder_sparse_step=1, mlp_only_layers=[])
    return dict(s, shared_expert_intermediate_size=c.int("shared_expert_intermediate_size"),
                shared_expert_gate=True, qkv_bias=c.bool("qkv_bias", True), norm_topk_prob=c.bool("norm_topk_prob", False),
                **_sliding(c, s))


def _qwen3_moe(c: _Config) -> dict:
    s = _standard(c, "moe_intermediate_size", eps=1e-6)
    _every_layer_moe(c, decoder_sparse_step=1, mlp_only_layers=[])
    bias = c.bool("attention_bias", False)
    return dict(s, qk_norm=True, qkv_bias=bias, o_proj_bias=bias,
                norm_topk_prob=c.bool("norm_topk_prob", False), **_sliding(c, s))


def _olmoe(c: _Config) -> dict:
    s = _standard(c, "intermediate_size")
    bias = c.bool("attention_bias", False)
    return dict(s, qk_norm=True, qkv_bias=bias, o_proj_bias=bias, clip_qkv=c.float("clip_qkv", default=0.0),
                norm_topk_prob=c.bool("norm_topk_prob", False))


def _dbrx(c: _Config) -> dict:
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
                **_common(c, "max_seq_len", 2048))


def _deepseek(c: _Config, v3: bool) -> dict:
    s = _standard(c, "moe_intermediate_size", eps=1e-6)
    _every_layer_moe(c, moe_layer_freq=1)
    nope, rope = c.int("qk_nope_head_dim"), c.int("qk_rope_head_dim")
    first = c.int("first_k_dense_replace", default=0)
    router = c.get("scoring_func", "sigmoid" if v3 else "softmax")
    if router not in ("softmax", "sigmoid"):
        raise SpecError(f"{c.model_type} config: field 'scoring_func' must be softmax or sigmoid, got {router!r}")
    s.update(head_dim=nope + rope, num_key_value_heads=s["num_attention_heads"])
    return dict(s, attention="mla", q_lora_rank=c.int("q_lora_rank", default=0),
                kv_lora_rank=c.int("kv_lora_rank"), qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                v_head_dim=c.int("v_head_dim"), first_dense_layers=first,
                dense_intermediate_size=c.int("intermediate_size") if first else 0,
                shared_expert_intermediate_size=c.int("n_shared_experts", default=0) * s["moe_intermediate_size"],
                router=router, norm_topk_prob=c.bool("norm_topk_prob", v3),
                routed_scaling_factor=c.float("routed_scaling_factor", default=1.0))


def _phimoe(c: _Config) -> dict:
    s = _standard(c, "intermediate_size", theta=1e6)
    bias = c.bool("attention_bias", False)
    return dict(s, norm="layer", qkv_bias=bias, o_proj_bias=bias, lm_head_bias=c.bool("lm_head_bias", False),
                norm_topk_prob=False, **_sliding(c, s))


def _gpt_oss(c: _Config) -> dict:
    s = _standard(c, "intermediate_size", theta=150000.0)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s["num_hidden_layers"])]
    bias = c.bool("attention_bias", True)
    return dict(s, attention_sinks=True, qkv_bias=bias, o_proj_bias=bias, norm_topk_prob=True,
                **_sliding(c, s, alternating))


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
}


def _read(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise SpecError(f"expected a config dict or a path, got {type(path_or_dict).__name__}")
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SpecError(f"no config.json at {path}")
    raw = load_json(read_text(path, "model config", SpecError), str(path), SpecError)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _check(spec: ModelSpec) -> None:
    where = f"{spec.model_type} config"
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "vocab_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if getattr(spec, f) <= 0:
            raise SpecError(f"{where}: {f} must be positive, got {getattr(spec, f)}")
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise SpecError(f"{where}: num_attention_heads {spec.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {spec.num_key_value_heads}")
    if spec.num_experts_per_tok > spec.num_experts:
        raise SpecError(f"{where}: top-k {spec.num_experts_per_tok} exceeds {spec.num_experts} experts")
    if spec.first_dense_layers >= spec.num_hidden_layers:
        raise SpecError(f"{where}: first_dense_layers {spec.first_dense_layers} leaves no MoE layer")
    for f in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "routed_scaling_factor"):
        if not getattr(spec, f) > 0:
            raise SpecError(f"{where}: {f} must be positive, got {getattr(spec, f)}")
    if spec.clip_qkv < 0:
        raise SpecError(f"{where}: clip_qkv must not be negative, got {spec.clip_qkv}")


def spec_from_hf_config(path_or_dict, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a config dict, a config.json path, or a directory holding config.json."""
    raw = _read(path_or_dict)
    model_type = raw.get("model_type")
    if not model_type:
        raise SpecError("config: missing field 'model_type'")
    supported = ", ".join(FAMILIES)
    if model_type not in FAMILIES:
        if model_type in DENSE_MODEL_TYPES:
            raise SpecError(f"unsupported model_type {model_type!r}: a dense model, not a supported MoE family; "
                            f"supported: {supported}")
        raise SpecError(f"unsupported model_type {model_type!r}; supported: {supported}")
    fields = FAMILIES[model_type](_Config(raw, model_type))
    spec = ModelSpec(name=name or raw.get("_name_or_path") or model_type, model_type=model_type, **fields)
    _check(spec)
    return spec


def builtin_models() -> list[str]:
    """Keys of the built-in configs, e.g. "mixtral-8x7b"."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model(name_or_path) -> ModelSpec:
    """A built-in model by key (case-insensitive) or Hub id, or a config.json path or a directory holding one.

    Built-in models are named by their key."""
    key = str(name_or_path).lower()
    if key in builtin_models():
        return spec_from_hf_config(CONFIG_DIR / f"{key}.json", name=key)
    if Path(name_or_path).exists():
        return spec_from_hf_config(name_or_path)
    for k in builtin_models():
        if str(_read(CONFIG_DIR / f"{k}.json").get("_name_or_path", "")).lower() == key:
            return spec_from_hf_config(CONFIG_DIR / f"{k}.json", name=k)
    raise SpecError(f"unknown model {str(name_or_path)!r}: neither a built-in model nor an existing path; "
                    f"built-in: {', '.join(builtin_models())}")
