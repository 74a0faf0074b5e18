"""Tensor parallelism in the cost model: the shape of one rank's shard (the runtime runs exactly that,
runtime/parallel.py) and the all-reduces that join the ranks' partial sums.

A plan for a profile of G GPUs is G ranks, each with its query and KV heads and its slice of every FFN's
intermediate width; the rest (embeddings, norms, routers, LM head) is replicated. After attention and after
the MoE of every layer and micro-batch, the ranks' partial outputs [tokens, hidden] are summed by a ring
all-reduce: 2 (G - 1) steps, each moving 1/G of the tensor between neighbours.
"""
from __future__ import annotations

from dataclasses import replace

from .spec import FULL_WIDTH_QK_NORM, ModelSpec

ALLREDUCES_PER_LAYER = 2


ALLREDUCE_STEP_S = 10e-6
"""Fixed cost of one ring step (a kernel launch and a peer handshake). Assumed, not measured: NCCL's ring on
a PCIe host takes some microseconds per step for small tensors; no profile of this project has measured
several GPUs yet (issue 21)."""


class ParallelError(ValueError):
    """A model or setting tensor parallelism cannot run (the message names the feature)."""


def unsupported(spec: ModelSpec, world: int) -> list[str]:
    """What of `spec` a `world`-way shard cannot hold (empty: it can)."""
    problems = []
    if spec.attention != "gqa":
        problems.append(f"attention {spec.attention!r} (only grouped-query attention is split by heads)")
    if spec.num_key_value_heads % world or spec.num_attention_heads % world:
        problems.append(f"{spec.num_attention_heads} query / {spec.num_key_value_heads} KV heads over {world} ranks")
    widths = {"moe_intermediate_size": spec.moe_intermediate_size,
              "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
              "dense_intermediate_size": spec.dense_intermediate_size if spec.first_dense_layers else 0}
    problems += [f"{name} {w} over {world} ranks" for name, w in widths.items() if w % world]
    if spec.model_type in FULL_WIDTH_QK_NORM and spec.qk_norm:
        problems.append(f"{spec.model_type}'s q/k norms over the full width (they would need the other ranks' heads)")
    if spec.dtypes.expert_format:
        problems.append(f"--expert-dtype {spec.dtypes.expert_format} (quantized experts are not sliced yet)")
    return problems


def shard_spec(spec: ModelSpec, world: int) -> ModelSpec:
    """The ModelSpec of one rank's shard: its heads and its slice of every FFN width."""
    if world <= 1:
        return spec
    problems = unsupported(spec, world)
    if problems:
        raise ParallelError(f"{spec.name}: tensor parallelism over {world} ranks does not support " + "; ".join(problems))
    return replace(spec, num_attention_heads=spec.num_attention_heads // world,
                   num_key_value_heads=spec.num_key_value_heads // world,
                   moe_intermediate_size=spec.moe_intermediate_size // world,
                   shared_expert_intermediate_size=spec.shared_expert_intermediate_size // world,
                   dense_intermediate_size=spec.dense_intermediate_size // world)


def can_shard(spec: ModelSpec, ranks: int) -> bool:
    """Whether `ranks` > 1 tensor-parallel ranks can hold `spec` (the runtime runs it so; hrm prices it so)."""
    return ranks > 1 and not unsupported(spec, ranks)


def ring_allreduce_s(nbytes, ranks: int, bytes_per_s: float, step_s: float = ALLREDUCE_STEP_S):
    """Seconds of a ring all-reduce of `nbytes` over `ranks` (0 for one): each of its 2 (ranks - 1) steps
    moves nbytes / ranks at `bytes_per_s` after a fixed `step_s`."""
    if ranks <= 1:
        return 0.0 * nbytes
    steps = 2 * (ranks - 1)
    return steps * (step_s + nbytes / ranks / bytes_per_s)
