"""The Hierarchical Roofline Model (paper section 3): attainable performance of a task computed at one
level with its data at the same or another level, turning points P1 and P2, and the balance point.

Levels are "gpu" and "cpu"; the link between them is the CPU-GPU interconnect. Intensities are FLOP per
byte of the data at the named level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .cost import Cost
from .hardware import HardwareProfile
from .spec import ModelSpec


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: a processor's peak FLOP/s and its memory's bandwidth."""
    name: str
    peak_flops: float
    mem_bytes_per_s: float

    @property
    def ridge(self) -> float:
        """Classic roofline ridge point: P_peak / B_peak."""
        return self.peak_flops / self.mem_bytes_per_s


@dataclass(frozen=True)
class Hierarchy:
    gpu: Level
    cpu: Level
    link_bytes_per_s: float      # CPU -> GPU

    @classmethod
    def of(cls, hw: HardwareProfile, dtype: str = "bf16") -> "Hierarchy":
        n = hw.gpu.count
        return cls(gpu=Level("gpu", hw.gpu.flops_per_s(dtype) * n, hw.gpu.mem_bytes_per_s * n),
                   cpu=Level("cpu", hw.cpu.flops_per_s("fp32"), hw.cpu.mem_bytes_per_s),
                   link_bytes_per_s=hw.link.h2d_bytes_per_s * hw.num_links)


def attainable(level: Level, intensity_local, link_bytes_per_s: float | None = None, intensity_remote=None):
    """P^i_x = min(P^i_peak, B^i * I^i_x [, B^{j,i} * I^j_x]) in FLOP/s."""
    p = np.minimum(level.peak_flops, level.mem_bytes_per_s * np.asarray(intensity_local, float))
    if link_bytes_per_s is not None:
        p = np.minimum(p, link_bytes_per_s * np.asarray(intensity_remote, float))
    return p


def turning_point_p1(h: Hierarchy, intensity_cpu=np.inf):
    """Intensity (w.r.t. CPU bytes) above which computing on the GPU with data pulled over the link
    beats computing on the CPU next to the data: min(P_cpu, B_cpu * I_cpu) / B_link.
    With the default (compute-bound CPU) this is P_cpu / B_link."""
    return np.minimum(h.cpu.peak_flops, h.cpu.mem_bytes_per_s * np.asarray(intensity_cpu, float)) / h.link_bytes_per_s


def turning_point_p2(h: Hierarchy, intensity_gpu=np.inf):
    """Intensity (w.r.t. CPU bytes) below which a GPU task fed from the CPU is bound by the link:
    min(P_gpu, B_gpu * I_gpu) / B_link."""
    return np.minimum(h.gpu.peak_flops, h.gpu.mem_bytes_per_s * np.asarray(intensity_gpu, float)) / h.link_bytes_per_s


def balance_intensity_cpu(h: Hierarchy, intensity_gpu):
    """The CPU-bytes intensity at which the link delivers exactly what the GPU's own memory roof
    allows: B_gpu * I_gpu = B_link * I_cpu."""
    return h.gpu.mem_bytes_per_s * np.asarray(intensity_gpu, float) / h.link_bytes_per_s


@dataclass(frozen=True)
class OperatorPoint:
    """An operator placed on the roofline: its intensities and attainable performance per placement."""
    name: str
    cost: Cost
    intensity_gpu: float           # FLOP per byte read from GPU memory
    intensity_cpu: float           # FLOP per byte that lives in CPU memory
    on_cpu_flops: float            # attainable computing next to the data on the CPU
    on_gpu_flops: float            # attainable on the GPU with the CPU-resident bytes pulled over the link


def place(h: Hierarchy, name: str, cost: Cost, cpu_resident_bytes: float) -> OperatorPoint:
    i_gpu = cost.flops / cost.bytes
    i_cpu = cost.flops / max(cpu_resident_bytes, 1e-30)
    return OperatorPoint(
        name=name, cost=cost, intensity_gpu=float(i_gpu), intensity_cpu=float(i_cpu),
        on_cpu_flops=float(attainable(h.cpu, i_cpu)),
        on_gpu_flops=float(attainable(h.gpu, i_gpu, h.link_bytes_per_s, i_cpu)),
    )


def decode_attention_point(h: Hierarchy, spec: ModelSpec, batch: int, ctx: int) -> OperatorPoint:
    """Decode attention with its KV cache in CPU memory: the cache is the bytes that would move."""
    c = ops.attention(spec, batch, 1, ctx)
    return place(h, f"attention N={batch} ctx={ctx}", c, c.kv_bytes)


def moe_ffn_point(h: Hierarchy, spec: ModelSpec, batch: int, micro_batch: int,
                  weights_gpu_frac: float = 0.0) -> OperatorPoint:
    """The routed experts of one layer for a pass of `batch` tokens in micro-batches of `micro_batch`:
    the CPU-resident weights cross the link once per pass, and are read from GPU memory once per
    micro-batch."""
    full, rest = divmod(batch, micro_batch)
    cost = ops.routed_experts(spec, micro_batch) * full
    if rest:
        cost = cost + ops.routed_experts(spec, rest)
    cpu_bytes = (1 - weights_gpu_frac) * spec.num_experts * spec.expert_bytes
    return place(h, f"MoE FFN N={batch} mu={micro_batch}", cost, cpu_bytes)
