"""A policy: how one pass over the model is laid out on the GPU, the CPU and the link between them."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


class PolicyError(ValueError):
    """A policy that is not self-consistent (the message names the field)."""


from .schedules import SCHEDULES


PREFILL_CHUNK_TOKENS = 4096
"""The runtime runs each micro-batch's prefill in chunks of whole sequences of at most this many tokens
(at least one sequence). GEMMs are near their peak rate from ~1,000 tokens (the H200's measured curve
flattens above 1,024), and the chunk, not the micro-batch, sets the prefill activation peak: without
chunks the prefill workspace bounded mu to ~36 under a 24 GB budget for Mixtral."""

MOE_DENSE_MAX_TOKENS = 64
"""The runtime's MoE takes its sync-free dense path (every expert on every token) up to this many tokens."""
MOE_GROUPED_SLICE_BYTES = 1 << 28
"""... then, where the GPU has a grouped GEMM, the grouped path, in slices of tokens whose gate|up
activations [tokens * k, 2I] stay within this many bytes (moe_grouped_slice_tokens)."""


def moe_grouped_slice_tokens(spec) -> int:
    """Tokens per slice of the grouped MoE path: a whole prefill chunk, unless its gate|up activations
    [tokens * k, 2I] would pass MOE_GROUPED_SLICE_BYTES (a slice holds them and their companions at once,
    hrm.memory.moe_workspace_bytes). Many small experts get whole chunks: at half a chunk Qwen3-30B-A3B's
    128 experts got 128 rows each and their grouped GEMMs ran at 267 TFLOP/s, at a whole chunk 452.
    Mixtral's 8 large ones get ~2,300 tokens: a whole chunk ran its GEMMs at 711 TFLOP/s against 627 at
    2,048, but doubled the slice's workspace (~0.8 GB more with the allocator's share), which cost the
    24 GB plans their resident experts (H200 2026-12-02, benchmarks/moe_kernels.py)."""
    per_token = spec.num_experts_per_tok * 2 * spec.moe_intermediate_size * spec.dtypes.act_bytes
    return int(max(1, min(PREFILL_CHUNK_TOKENS, MOE_GROUPED_SLICE_BYTES // per_token)))


def device_micro_batches(kv_gpu_frac, num_micro_batches):
    """Micro-batches whose KV cache lives on the GPU: r_c realised per whole micro-batch (floor);
    numpy-broadcast (an int for scalars)."""
    k = np.floor(np.asarray(kv_gpu_frac, float) * np.asarray(num_micro_batches, float) + 1e-9)
    return int(k) if k.ndim == 0 else k


def realised_kv_frac(kv_gpu_frac, num_micro_batches):
    """r_c as the runtime realises it: device_micro_batches / micro-batches."""
    return device_micro_batches(kv_gpu_frac, num_micro_batches) / np.asarray(num_micro_batches, float)


KV_BLOCK_RATIO = 1.125
"""In the packed mode a micro-batch's KV cache is sized by its sequences' own lengths: consecutive
sequences share a dense block [rows, n_kv, slots, d] while their capacities (prompt + new tokens) lie
within this ratio of the block's largest. A pass then holds at most this much more than its sequences'
own slots, for a few more attention calls per micro-batch (about log(longest / shortest) / log(ratio))."""


def kv_blocks(capacities) -> tuple[tuple[int, int, int], ...]:
    """(first row, stop row, slots per row) of the KV blocks of a micro-batch whose rows need
    `capacities` slots each (in the order given; descending in the packed layout)."""
    out: list[tuple[int, int, int]] = []
    for row, cap in enumerate(capacities):
        if out and cap <= out[-1][2] and cap * KV_BLOCK_RATIO >= out[-1][2]:
            out[-1] = (out[-1][0], row + 1, out[-1][2])
        else:
            out.append((row, row + 1, cap))
    return tuple(out)


def prefill_chunk_sequences(prompt_len):
    """Sequences per prefill chunk at a prompt length (numpy-friendly)."""
    return np.maximum(1, PREFILL_CHUNK_TOKENS // np.maximum(1, np.asarray(prompt_len, dtype=int)))


@dataclass(frozen=True)
class Placement:
    """Where attention (A_g) and the routed experts (F_g) run, and the schedule that overlaps them: the
    part of a policy that the solvers hold fixed while they vary N, mu, r_w and r_c."""
    attention_on_gpu: bool = False
    ffn_on_gpu: bool = True
    schedule: str = "cgopipe"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise PolicyError(f"schedule must be one of {tuple(SCHEDULES)}, got {self.schedule!r}")
        if not SCHEDULES[self.schedule].allows(self.attention_on_gpu):
            raise PolicyError(f"schedule {self.schedule!r} runs attention on the CPU" if self.attention_on_gpu
                              else f"schedule {self.schedule!r} runs attention on the GPU: set attention_on_gpu")

    def describe(self) -> str:
        attn = "GPU" if self.attention_on_gpu else "CPU"
        ffn = "GPU" if self.ffn_on_gpu else "CPU"
        return f"attention {attn}, experts {ffn}, {self.schedule}"


class ReadsPlacement:
    """attention_on_gpu, ffn_on_gpu and schedule, read through the holder's `placement`."""
    placement: Placement

    @property
    def attention_on_gpu(self) -> bool:
        return self.placement.attention_on_gpu

    @property
    def ffn_on_gpu(self) -> bool:
        return self.placement.ffn_on_gpu

    @property
    def schedule(self) -> str:
        return self.placement.schedule


@dataclass(frozen=True)
class Policy:
    """A whole policy. The placement's three fields are stored flat, as plan files and the constructor
    have them; `placement` is the same as one value."""
    batch_size: int                # N: sequences per pass of the whole model
    micro_batch_size: int          # mu: sequences per micro-batch (the last one may be smaller)
    attention_on_gpu: bool = False  # A_g
    ffn_on_gpu: bool = True        # F_g
    weights_gpu_frac: float = 0.0  # r_w: fraction of routed-expert weights resident on the GPU
    kv_gpu_frac: float = 0.0       # r_c: fraction of the KV cache resident on the GPU
    schedule: str = "cgopipe"

    def __post_init__(self):
        if self.batch_size < 1:
            raise PolicyError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.micro_batch_size <= self.batch_size:
            raise PolicyError(f"micro_batch_size must be in [1, batch_size={self.batch_size}], "
                              f"got {self.micro_batch_size}")
        for name in ("weights_gpu_frac", "kv_gpu_frac"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise PolicyError(f"{name} must be in [0, 1], got {v}")
        self.placement                                     # its own checks

    @classmethod
    def at(cls, placement: Placement, batch_size: int, micro_batch_size: int, weights_gpu_frac: float = 0.0,
           kv_gpu_frac: float = 0.0) -> "Policy":
        return cls(batch_size, micro_batch_size, placement.attention_on_gpu, placement.ffn_on_gpu,
                   weights_gpu_frac, kv_gpu_frac, placement.schedule)

    @property
    def placement(self) -> Placement:
        return Placement(self.attention_on_gpu, self.ffn_on_gpu, self.schedule)

    @property
    def num_micro_batches(self) -> int:
        return -(-self.batch_size // self.micro_batch_size)

    @property
    def micro_batch_sizes(self) -> tuple[int, ...]:
        full, rest = divmod(self.batch_size, self.micro_batch_size)
        return (self.micro_batch_size,) * full + ((rest,) if rest else ())

    def for_batch(self, batch_size: int) -> "Policy":
        """The same policy for a pass of `batch_size` sequences (micro-batches no larger than the pass)."""
        return replace(self, batch_size=batch_size, micro_batch_size=min(self.micro_batch_size, batch_size))

    def resident_experts(self, num_experts: int) -> int:
        """Experts per layer kept on the GPU: r_w realised per whole expert (floor, as the artifact)."""
        return int(num_experts * self.weights_gpu_frac + 1e-9)

    def short(self) -> str:
        where = "gpu" if self.attention_on_gpu else "cpu"
        return (f"N={self.batch_size} mu={self.micro_batch_size} attn={where} "
                f"r_w={self.weights_gpu_frac:.3f} r_c={self.kv_gpu_frac:.2f} {self.schedule}")
