"""Tensor parallelism over the ranks of one torch.distributed group (NCCL on GPUs, gloo on the CPU).

Each rank holds a shard of every layer and runs the same pipeline (prefill, decode schedule, CPU attention)
over it, on a ModelSpec of its shard's shape (`shard_spec`: its query and KV heads, its slice of every
FFN's intermediate width), so the memory account, the KV cache and the CPU attention are the rank's own:
- attention: q/k/v projections (and their biases, and gpt-oss's sinks) split by heads, o_proj by its input
  columns; the rank's partial output is summed over the ranks (one all-reduce per layer and micro-batch);
- FFNs (routed experts, shared experts, dense layers' MLPs): gate and up split by rows of the intermediate
  width, down by its columns; the router is replicated, so every rank routes alike; a second all-reduce;
- biases added after a sum (o_proj's, the experts' down) are held by rank 0 only;
- embeddings, norms, routers and the LM head are replicated: every rank samples the same tokens.
Weights are read (or synthesised) at the whole model's shapes one tensor at a time and sliced (`Shard`), so
a tensor-parallel model is exactly the one-rank model cut.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hrm.parallel import ParallelError, shard_spec  # noqa: F401  (ParallelError: the runtime's refusals too)
from hrm.spec import ModelSpec


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int
    group: object = None          # a torch.distributed process group; None: the default group


_ACTIVE: TensorParallel | None = None


def activate(tp: TensorParallel | None) -> None:
    """Set the group the runtime's layers reduce over (runtime.model.post_attention); None: one rank."""
    global _ACTIVE
    _ACTIVE = tp if tp is not None and tp.world > 1 else None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of each rank's partial `x` (in place); `x` itself with one rank."""
    tp = _ACTIVE
    if tp is None:
        return x
    import torch.distributed as dist
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp.group)
    return x


def from_environment(device_type: str) -> TensorParallel | None:
    """The group torchrun describes (WORLD_SIZE > 1 in the environment), initialised once: NCCL for CUDA
    devices, gloo for the CPU. None when the process runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def shutdown(tp: TensorParallel | None) -> None:
    """End this rank's part after a pass that succeeded: wait for the others, then close the group (a rank
    that exits while another still talks to it aborts that one)."""
    if tp is None:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier(group=tp.group)
        dist.destroy_process_group()


ROW_SPLIT = ("q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "sinks", "gate", "up", "gate_bias",
             "up_bias")
"""Tensors (by the last part of our name) split along their first dimension: heads, intermediate rows."""
COLUMN_SPLIT = ("o_proj", "down")
"""... along their second: the inputs of the projections whose outputs are summed over the ranks."""
RANK_ZERO = ("o_bias", "down_bias")
"""... added once after the sum: rank 0 holds them, the others zeros."""


@dataclass(frozen=True)
class Shard:
    """One rank's cut of the whole model `full` (a ModelSpec) over `world` ranks."""
    full: ModelSpec
    rank: int
    world: int

    @property
    def spec(self) -> ModelSpec:
        """The ModelSpec of this rank's part (hrm.parallel.shard_spec)."""
        return shard_spec(self.full, self.world)

    def cut(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of tensor `name` (our names: runtime.weights.weight_shapes) given whole."""
        part = name.rsplit(".", 1)[-1]
        if part in RANK_ZERO:
            return whole if self.rank == 0 else torch.zeros_like(whole)
        if part in ROW_SPLIT:
            return whole.chunk(self.world, dim=0)[self.rank]
        if part in COLUMN_SPLIT:
            return whole.chunk(self.world, dim=1)[self.rank]
        return whole
