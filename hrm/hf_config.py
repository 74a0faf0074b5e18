"""Hugging Face config.json -> ModelSpec, and the built-in registry of MoE configs (hrm/configs/*.json).

The families are hrm.hf_families.FAMILIES (their readers over hrm.hf_fields). A null field counts as
absent. Defaults for absent optional fields follow transformers' config classes.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checks import load_json, read_text
from .hf_families import (CHUNKED_ATTENTION_FAMILIES, FAMILIES, LINEAR_ATTENTION_FAMILIES, MAMBA_FAMILIES,
                          SPARSE_ATTENTION_FAMILIES, UNPRICED_FAMILIES)
from .hf_fields import Config
from .spec import ModelSpec, SpecError

CONFIG_DIR = Path(__file__).with_name("configs")

DENSE_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi",
    "phi3", "olmo", "olmo2", "gpt2", "gpt_neox", "gptj", "falcon", "deepseek", "starcoder2", "cohere",
    "internlm2", "stablelm", "opt", "bloom", "mpt",
})


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


PRICED_LAYER_KINDS = frozenset({"full_attention", "sliding_attention"})
"""The layer kinds a ModelSpec describes (attention over the whole context or a window, then the FFN)."""


def unpriced_layers(raw: dict) -> str | None:
    """What a config's layers hold that ModelSpec cannot price (linear attention, Mamba, convolutions,
    chunked attention, indexed attention outside SPARSE_ATTENTION_FAMILIES ...), as words for the refusal;
    None when every layer is of a priced kind."""
    family = raw.get("model_type")
    priced = (PRICED_LAYER_KINDS | ({"indexed_attention"} if family in SPARSE_ATTENTION_FAMILIES else set())
              | ({"chunked_attention"} if family in CHUNKED_ATTENTION_FAMILIES else set())
              | ({"linear_attention"} if family in LINEAR_ATTENTION_FAMILIES else set())
              | ({"mamba", "attention"} if family in MAMBA_FAMILIES else set()))   # the Hub's own names
    for key in ("layer_types", "layers_block_type"):
        kinds = raw.get(key)
        if isinstance(kinds, list):
            odd = sorted({k for k in kinds if isinstance(k, str)} - priced)
            if odd:
                return f"its {', '.join(map(repr, odd))} layers (field {key!r})"
    if family not in MAMBA_FAMILIES and any(k.startswith("mamba_") for k in raw):
        return "its Mamba layers (fields mamba_*)"
    return None


def spec_from_hf_config(path_or_dict, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a config dict, a config.json path, or a directory holding config.json."""
    raw = _read(path_or_dict)
    model_type = raw.get("model_type")
    if not model_type:
        raise SpecError("config: missing field 'model_type'")
    supported = ", ".join(FAMILIES)
    odd = unpriced_layers(raw)
    if odd:
        raise SpecError(f"model_type {model_type!r}: {odd} are not priced (ModelSpec describes attention and MoE "
                        f"layers only); supported: {supported}")
    if model_type not in FAMILIES:
        if model_type in UNPRICED_FAMILIES:
            raise SpecError(f"model_type {model_type!r}: {UNPRICED_FAMILIES[model_type]} are not priced; "
                            f"supported: {supported}")
        if model_type in DENSE_MODEL_TYPES:
            raise SpecError(f"unsupported model_type {model_type!r}: a dense model, not a supported MoE family; "
                            f"supported: {supported}")
        raise SpecError(f"unsupported model_type {model_type!r}; supported: {supported}")
    fields = FAMILIES[model_type](Config(raw, model_type))
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
