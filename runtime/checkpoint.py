"""Load a Hugging Face checkpoint directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) tensor by tensor straight into a WeightStore.

Hub names are per expert (Mixtral `block_sparse_moe.experts.E.{w1,w3,w2}`, Qwen/OLMoE
`mlp.experts.E.{gate_proj,up_proj,down_proj}`); transformers' in-memory fused layout
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) is read too, one expert slice at
a time. Each tensor is read once and copied into its final place, so the model is never held twice.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from hrm.hf_config import spec_from_hf_config
from hrm.spec import ModelSpec

from .weights import WeightStore, weight_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SHOW_AT_MOST = 5


class CheckpointError(ValueError):
    """A checkpoint that does not match the ModelSpec (the message names the tensors)."""


@dataclass(frozen=True)
class Copy:
    """Copy `source[index]` of a Hub tensor into our tensor `target` (index None: the whole tensor)."""
    target: str
    index: tuple | None = None


@dataclass(frozen=True)
class HubTensor:
    shape: tuple[int, ...]
    copies: tuple[Copy, ...]


def read_spec(model_dir: str | Path) -> ModelSpec:
    """The ModelSpec of a checkpoint directory, from its config.json."""
    return spec_from_hf_config(str(Path(model_dir) / "config.json"))


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Hub tensor name -> the safetensors file holding it."""
    d = Path(model_dir)
    if (d / INDEX_FILE).exists():
        weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
        return {name: d / file for name, file in weight_map.items()}
    if (d / SINGLE_FILE).exists():
        with safe_open(d / SINGLE_FILE, framework="pt") as f:
            return {name: d / SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{d}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def hub_layout(spec: ModelSpec, present: set[str]) -> dict[str, HubTensor]:
    """Expected Hub tensors for `spec`, each with the copies into our names. `present` picks the expert
    layout (per expert or fused) and Mixtral's block prefix."""
    h, i_e = spec.hidden_size, spec.moe_intermediate_size
    ours = weight_shapes(spec)
    out: dict[str, HubTensor] = {}

    def dense(hub: str, target: str) -> None:
        out[hub] = HubTensor(ours[target], (Copy(target),))

    dense("model.embed_tokens.weight", "embed")
    dense("model.norm.weight", "norm")
    if not spec.tie_word_embeddings:
        dense("lm_head.weight", "lm_head")
    fused = any(n.endswith(".experts.gate_up_proj") for n in present)
    block = "mlp"
    if spec.model_type == "mixtral" and any(".block_sparse_moe." in n for n in present):
        block = "block_sparse_moe"
    per_expert = {"gate": "w1", "up": "w3", "down": "w2"} if block == "block_sparse_moe" else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for layer in range(spec.num_hidden_layers):
        p, t = f"model.layers.{layer}.", f"layers.{layer}."
        dense(p + "input_layernorm.weight", t + "input_norm")
        dense(p + "post_attention_layernorm.weight", t + "post_attention_norm")
        for x in "qkvo":
            dense(p + f"self_attn.{x}_proj.weight", t + f"{x}_proj")
            if t + f"{x}_bias" in ours:
                dense(p + f"self_attn.{x}_proj.bias", t + f"{x}_bias")
        for x in "qk":
            if t + f"{x}_norm" in ours:
                dense(p + f"self_attn.{x}_norm.weight", t + f"{x}_norm")
        dense(p + f"{block}.gate.weight", t + "router")
        if t + "shared.gate" in ours:
            for part in ("gate", "up", "down"):
                dense(p + f"mlp.shared_expert.{part}_proj.weight", t + f"shared.{part}")
            if t + "shared.gate_weight" in ours:
                dense(p + "mlp.shared_expert_gate.weight", t + "shared.gate_weight")
        e_names = [f"{t}experts.{e}." for e in range(spec.num_experts)]
        if fused:
            out[p + f"{block}.experts.gate_up_proj"] = HubTensor(
                (spec.num_experts, 2 * i_e, h),
                tuple(c for e, n in enumerate(e_names)
                      for c in (Copy(n + "gate", (e, slice(0, i_e))), Copy(n + "up", (e, slice(i_e, 2 * i_e))))))
            out[p + f"{block}.experts.down_proj"] = HubTensor(
                (spec.num_experts, h, i_e), tuple(Copy(n + "down", (e,)) for e, n in enumerate(e_names)))
        else:
            for e, n in enumerate(e_names):
                for part, hub_part in per_expert.items():
                    out[p + f"{block}.experts.{e}.{hub_part}.weight"] = HubTensor(ours[n + part], (Copy(n + part),))
    return out



def _listing(kind: str, names: list[str]) -> str:
    more = f" (+{len(names) - SHOW_AT_MOST} more)" if len(names) > SHOW_AT_MOST else ""
    return f"{len(names)} {kind}: {', '.join(names[:SHOW_AT_MOST])}{more}"


def check_checkpoint(model_dir: str | Path, spec: ModelSpec) -> tuple[dict[str, Path], dict[str, HubTensor]]:
    """Files and expected layout of a checkpoint; one CheckpointError naming missing, extra,
    mis-shaped or non-float tensors."""
    files = checkpoint_files(model_dir)
    layout = hub_layout(spec, set(files))
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(set(files.values())):
        if not path.exists():
            raise CheckpointError(f"{model_dir}: shard {path.name} listed in {INDEX_FILE} is missing")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                found[name] = (tuple(sl.get_shape()), sl.get_dtype())
    ignored = {n for n in found if n.endswith(IGNORED_SUFFIXES)
               or (spec.tie_word_embeddings and n == "lm_head.weight")}
    missing = sorted(set(layout) - set(found))
    extra = sorted(set(found) - set(layout) - ignored)
    unlisted = sorted(n for n in files if n not in found)
    bad_shape = sorted(f"{n} {list(found[n][0])} != {list(t.shape)}" for n, t in layout.items()
                       if n in found and found[n][0] != t.shape)
    bad_dtype = sorted(f"{n} {found[n][1]}" for n in layout if n in found and found[n][1] not in FLOAT_DTYPES)
    problems = [_listing(kind, names) for kind, names in
                (("missing", missing), ("unexpected", extra), ("mis-shaped", bad_shape),
                 ("not float", bad_dtype), ("listed in the index but absent", unlisted)) if names]
    if problems:
        raise CheckpointError(f"{model_dir} does not match {spec.name} ({spec.model_type}): "
                              + "; ".join(problems))
    return files, layout


def load_checkpoint(model_dir: str | Path, store: WeightStore, progress: bool | None = None) -> None:
    """Fill `store` from a checkpoint directory, one tensor at a time (bf16/fp16/fp32 converted to the
    store's dtype). progress: a tqdm bar (default: only when stderr is a terminal)."""
    from tqdm import tqdm

    files, layout = check_checkpoint(model_dir, store.spec)
    by_file: dict[Path, list[str]] = {}
    for name in layout:
        by_file.setdefault(files[name], []).append(name)
    total_bytes = sum(math.prod(t.shape) for t in layout.values()) * store.dtype.itemsize
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
        for path, names in sorted(by_file.items()):
            with safe_open(path, framework="pt") as f:
                for name in names:
                    copies = layout[name].copies
                    if len(copies) == 1 and copies[0].index is None:
                        store.target(copies[0].target).copy_(f.get_tensor(name))
                    else:
                        sl = f.get_slice(name)
                        for c in copies:
                            store.target(c.target).copy_(sl[c.index])
                    bar.update(math.prod(layout[name].shape) * store.dtype.itemsize)

