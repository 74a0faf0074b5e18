"""Load a Hugging Face checkpoint directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) tensor by tensor straight into a WeightStore.

Hub names are per expert (Mixtral `block_sparse_moe.experts.E.{w1,w3,w2}`, Qwen/OLMoE
`mlp.experts.E.{gate_proj,up_proj,down_proj}`); transformers' in-memory fused layout
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) is read too, one expert slice at
a time. Each tensor is read once and copied into its final place, so the model is never held twice.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from safetensors import SafetensorError, safe_open

from hrm.checks import coerce, load_json, need, one_line, read_text
from hrm.hf_config import spec_from_hf_config
from hrm.spec import ModelSpec, SpecError

from .families import SHARED_NAMES, qk_norm_names, router_name
from .mla import MLA_HUB_NAMES, mla_shapes
from .weights import WeightStore, weight_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SHOW_AT_MOST = 5
MAX_HEADER_BYTES = 100 * 2 ** 20          # as safetensors itself
COPY_CHUNK_BYTES = 4 * 2 ** 20            # rows copied and checked for NaN at a time (cache-sized)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
CONFIG_FREE_FIELDS = ("name", "dtypes", "num_hidden_layers")


class CheckpointError(ValueError):
    """A checkpoint that does not match the ModelSpec (the message names the tensors)."""


@dataclass(frozen=True)
class Copy:
    """Copy `source[index]` of a Hub tensor into our tensor `target` (index None: the whole tensor), through
    `transform` (TRANSFORMS) where the Hub stores it otherwise (gpt-oss: experts transposed, gate and up
    interleaved)."""
    target: str
    index: tuple | None = None
    transform: str = ""


TRANSFORMS = {"t": lambda x: x.t(), "even_t": lambda x: x[:, 0::2].t(), "odd_t": lambda x: x[:, 1::2].t(),
              "even": lambda x: x[0::2], "odd": lambda x: x[1::2]}


@dataclass(frozen=True)
class HubTensor:
    shape: tuple[int, ...]
    copies: tuple[Copy, ...]


def read_spec(model_dir: str | Path) -> ModelSpec:
    """The ModelSpec of a checkpoint directory, from its config.json (an error names the file)."""
    path = Path(model_dir) / "config.json"
    try:
        return spec_from_hf_config(str(path))
    except SpecError as e:
        raise CheckpointError(e if str(path) in str(e) else f"{path}: {e}") from None


def check_config(model_dir: str | Path, spec: ModelSpec) -> None:
    """The model to run is the checkpoint's own: every field of its config.json's spec that changes the
    math (all but the name, the dtypes and the layer count, which the tensors check) equal."""
    if not (Path(model_dir) / "config.json").is_file():
        return
    theirs = read_spec(model_dir)
    differ = [f"{f.name} {getattr(spec, f.name)!r} != {getattr(theirs, f.name)!r}" for f in fields(ModelSpec)
              if f.name not in CONFIG_FREE_FIELDS and getattr(spec, f.name) != getattr(theirs, f.name)]
    if differ:
        raise CheckpointError(f"the model to run ({spec.name}) is not {Path(model_dir) / 'config.json'}'s: "
                              + _listing("fields differ (ours != checkpoint's)", differ))


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors file's header, checked against the file's size
    (a zero-byte, truncated or foreign file, a directory, offsets outside the data) before any weight is read."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a safetensors file")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path} is not a safetensors file or is truncated ({size:,} bytes"
                                      + (f", header of {n:,} bytes)" if n >= 0 else ")"))
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = load_json(raw.decode("utf-8"), f"{path} header", CheckpointError)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a safetensors file (its header is not UTF-8 JSON)") from None
    need(header, dict, f"{path} header", CheckpointError)
    data_bytes, out = size - 8 - n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        entry = need(entry, dict, where, CheckpointError)
        dtype, shape = entry.get("dtype"), coerce(tuple[int, ...], entry.get("shape"), f"{where} shape", CheckpointError)
        start, stop = coerce(tuple[int, int], entry.get("data_offsets"), f"{where} data_offsets", CheckpointError)
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not start <= stop <= data_bytes or stop - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{where}: data_offsets [{start}, {stop}] do not hold {dtype} {list(shape)} within "
                                  f"the file's {data_bytes:,} data bytes (truncated or corrupt)")
        out[name] = (shape, dtype)
    return out


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Hub tensor name -> the safetensors file holding it."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}" if not d.exists() else f"{d} is not a directory")
    if (d / INDEX_FILE).exists():
        where = str(d / INDEX_FILE)
        index = need(load_json(read_text(d / INDEX_FILE, "checkpoint index", CheckpointError), where, CheckpointError),
                     dict, where, CheckpointError)
        if "weight_map" not in index:
            raise CheckpointError(f"{where}: missing 'weight_map'")
        weight_map = coerce(dict[str, str], index["weight_map"], f"{where}: weight_map", CheckpointError)
        for file in set(weight_map.values()):
            if Path(file).is_absolute() or ".." in Path(file).parts or not file:
                raise CheckpointError(f"{where}: shard {file!r} is not a file name inside {d}")
        return {name: d / file for name, file in weight_map.items()}
    if (d / SINGLE_FILE).exists():
        return {name: d / SINGLE_FILE for name in read_header(d / SINGLE_FILE)}
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
        if spec.attention == "mla":
            for ours_name in mla_shapes(spec):
                dense(p + "self_attn." + MLA_HUB_NAMES[ours_name], t + ours_name)
        else:
            for x in "qkvo":
                dense(p + f"self_attn.{x}_proj.weight", t + f"{x}_proj")
                if t + f"{x}_bias" in ours:
                    dense(p + f"self_attn.{x}_proj.bias", t + f"{x}_bias")
        for x, hub_norm in zip("qk", qk_norm_names(spec.model_type)):
            if t + f"{x}_norm" in ours:
                dense(p + f"self_attn.{hub_norm}.weight", t + f"{x}_norm")
        if t + "sinks" in ours:
            dense(p + "self_attn.sinks", t + "sinks")
        if layer < spec.first_dense_layers:
            for part in ("gate", "up", "down"):
                dense(p + f"mlp.{part}_proj.weight", t + f"mlp.{part}")
            continue
        router = router_name(spec.model_type, block)
        dense(p + f"{router}.weight", t + "router")
        if t + "router_bias" in ours:
            dense(p + f"{router}.bias", t + "router_bias")
        if t + "score_bias" in ours:
            dense(p + f"{router}.e_score_correction_bias", t + "score_bias")
        if t + "shared.gate" in ours:
            shared = SHARED_NAMES.get(spec.model_type, "mlp.shared_expert")
            for part in ("gate", "up", "down"):
                dense(p + f"{shared}.{part}_proj.weight", t + f"shared.{part}")
            if t + "shared.gate_weight" in ours:
                dense(p + "mlp.shared_expert_gate.weight", t + "shared.gate_weight")
        e_names = [f"{t}experts.{e}." for e in range(spec.num_experts)]
        if spec.model_type == "gpt_oss":
            out.update(_gpt_oss_experts(p + "mlp.experts.", e_names, spec))
        elif fused:
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


def _gpt_oss_experts(p: str, e_names: list[str], spec: ModelSpec) -> dict[str, HubTensor]:
    """gpt-oss's experts in bf16: gate_up_proj [E, H, 2I] (x @ W; gate and up interleaved by column) with its
    bias [E, 2I], down_proj [E, I, H] with its bias [E, H]."""
    e_all, h, i = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size

    def per(*parts: tuple[str, str]) -> tuple[Copy, ...]:          # (our part, transform) of every expert
        return tuple(Copy(n + target, (e,), how) for e, n in enumerate(e_names) for target, how in parts)
    return {p + "gate_up_proj": HubTensor((e_all, h, 2 * i), per(("gate", "even_t"), ("up", "odd_t"))),
            p + "gate_up_proj_bias": HubTensor((e_all, 2 * i), per(("gate_bias", "even"), ("up_bias", "odd"))),
            p + "down_proj": HubTensor((e_all, i, h), per(("down", "t"))),
            p + "down_proj_bias": HubTensor((e_all, h), per(("down_bias", "")))}



def _listing(kind: str, names: list[str]) -> str:
    more = f" (+{len(names) - SHOW_AT_MOST} more)" if len(names) > SHOW_AT_MOST else ""
    return f"{len(names)} {kind}: {', '.join(names[:SHOW_AT_MOST])}{more}"


def check_checkpoint(model_dir: str | Path, spec: ModelSpec) -> tuple[dict[str, Path], dict[str, HubTensor]]:
    """Files and expected layout of a checkpoint; one CheckpointError naming missing, extra,
    mis-shaped or non-float tensors."""
    check_config(model_dir, spec)
    files = checkpoint_files(model_dir)
    layout = hub_layout(spec, set(files))
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(set(files.values())):
        if not path.exists():
            raise CheckpointError(f"{model_dir}: shard {path.name} listed in {INDEX_FILE} is missing")
        found.update(read_header(path))
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


def load_checkpoint(model_dir: str | Path, store: WeightStore, progress: bool | None = None, shard=None) -> None:
    """Fill `store` from a checkpoint directory, one tensor at a time (bf16/fp16/fp32 converted to the
    store's dtype). progress: a tqdm bar (default: only when stderr is a terminal). shard: a
    runtime.parallel.Shard: the checkpoint is of its whole model, each tensor read whole and cut."""
    import torch
    from tqdm import tqdm

    files, layout = check_checkpoint(model_dir, store.spec if shard is None else shard.full)
    whole_shapes = weight_shapes(shard.full) if shard is not None else {}
    by_file: dict[Path, list[str]] = {}
    for name in layout:
        by_file.setdefault(files[name], []).append(name)
    total_bytes = sum(math.prod(t.shape) for t in layout.values()) * store.dtype.itemsize
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
        for path, names in sorted(by_file.items()):
            try:
                with safe_open(path, framework="pt") as f:
                    for name in names:
                        sl = f.get_slice(name)
                        for c in layout[name].copies:
                            where = f"{path}: tensor {name!r}"
                            dest = (store.target(c.target) if shard is None else
                                    torch.empty(whole_shapes[c.target], dtype=store.dtype))
                            if c.transform:
                                _copy_transformed(dest, sl, c, where)
                            else:
                                _copy_finite(dest, sl, c.index, where)
                            if shard is not None:
                                store.target(c.target).copy_(shard.cut(c.target, dest))
                        bar.update(math.prod(layout[name].shape) * store.dtype.itemsize)
            except SafetensorError as e:
                raise CheckpointError(f"{path}: {one_line(e)}") from None
    store.seal()


def _copy_finite(target, sl, index: tuple | None, where: str) -> None:
    """target.copy_(sl[index]) in chunks of rows of at most COPY_CHUNK_BYTES, each chunk checked for NaN
    and infinity right after its copy, while it is still in cache (no second pass over memory)."""
    import torch

    if not target.numel():
        return
    base = tuple(index or ())
    lead, offset = (base[:-1], base[-1].start or 0) if base and isinstance(base[-1], slice) else (base, 0)
    rows = target.shape[0] if target.dim() else 1
    row_bytes = max(1, target[0].numel() * target.element_size() if target.dim() else target.element_size())
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    finite = torch.ones((), dtype=torch.bool, device=target.device)
    for a in range(0, rows, step):
        part = target[a:a + step]
        part.copy_(sl[lead + (slice(offset + a, offset + a + len(part)),)])
        finite &= torch.isfinite(part).all()
    if not bool(finite):
        raise CheckpointError(f"{where} holds NaN or infinite values (or values beyond {target.dtype}'s range)")



def _copy_transformed(target, sl, c: Copy, where: str) -> None:
    """target.copy_(TRANSFORMS[c.transform](sl[c.index])), checked for NaN and infinity (one expert's slice
    read at a time)."""
    import torch

    part = TRANSFORMS[c.transform](sl[c.index])
    target.copy_(part)
    if not bool(torch.isfinite(target).all()):
        raise CheckpointError(f"{where} holds NaN or infinite values (or values beyond {target.dtype}'s range)")
