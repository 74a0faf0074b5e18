"""What the policy search may choose, and within which memory budgets.

- `Budgets`: the bytes a plan may use on the GPU(s) and in host memory. By default the profile's memory
  times a safety fraction (0.9); the user can set either budget outright (`--gpu-memory 16GiB`), so a
  big GPU can be priced as a small one.
- `PlacementOption`: a placement (hrm.policy.Placement: where attention and the routed experts run and which
  schedule overlaps them), plus the restrictions a baseline imposes (fixed expert or KV fractions, a single micro-batch).
- `Resolution`: how finely the adaptive search enumerates (N, mu); `Pairs`: an explicit set instead.
- Enumeration helpers shared by both solvers: integer grids and the refinement boxes around a point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hrm.estimate import Setting
from hrm.policy import Placement, ReadsPlacement
from hrm.memory import GPU_HEADROOM_FRAC, HOST_HEADROOM_FRAC
from hrm.units import format_size, parse_size
from hrm.hardware import HardwareProfile
from hrm.host import this_machine_available_bytes
from hrm.spec import ModelSpec, Workload

DEFAULT_GPU_FRAC = 1.0
"""Share of the profile's GPU memory a plan may use by default: the CUDA context, the allocator's slack and
the workspaces are parts of the memory account, and the search keeps hrm.memory.GPU_HEADROOM_FRAC free."""
DEFAULT_CPU_FRAC = 0.9
"""Share of a profile's host memory a plan may use when the profile is not this machine's (the OS and
other processes hold the rest); on the profiled machine itself the default is what it has available."""

KV_FRAC_STEP = 1e-4
"""kv_gpu_frac is realised on this grid, rounded down, so a plan never overshoots its GPU budget."""


class SearchError(ValueError):
    """The request cannot be planned; the message is one line that says what is missing and by how much."""


# ---------------------------------------------------------------------------------------------------
# budgets

@dataclass(frozen=True)
class Budgets:
    """Bytes a plan may use: all GPUs together, and host DRAM (pinned memory counts within it).

    gpu_total_bytes / cpu_total_bytes are the process's totals as stated (the user's --gpu-memory, or the
    profile's); gpu_bytes / cpu_bytes, what the search lets the memory account reach, keep the headroom
    (hrm.memory.GPU_HEADROOM_FRAC, HOST_HEADROOM_FRAC) free. Built directly, the totals default to the limits."""
    gpu_bytes: float
    cpu_bytes: float
    gpu_source: str = ""     # how the number was obtained, for printouts and plan files
    cpu_source: str = ""
    gpu_total_bytes: float = 0.0
    cpu_total_bytes: float = 0.0

    def __post_init__(self):
        for name in ("gpu_bytes", "cpu_bytes"):
            v = getattr(self, name)
            if not v > 0 or not math.isfinite(v):
                raise SearchError(f"{name} budget must be positive, got {v}")
        for name, limit in (("gpu_total_bytes", self.gpu_bytes), ("cpu_total_bytes", self.cpu_bytes)):
            if not getattr(self, name):
                object.__setattr__(self, name, float(limit))

    @classmethod
    def from_totals(cls, gpu_total: float, cpu_total: float, gpu_source: str, cpu_source: str) -> "Budgets":
        """Budgets from the process's totals, with the headroom kept free."""
        gpu, cpu = gpu_total * (1 - GPU_HEADROOM_FRAC), cpu_total * (1 - HOST_HEADROOM_FRAC)
        return cls(gpu_bytes=float(gpu), cpu_bytes=float(cpu), gpu_total_bytes=float(gpu_total),
                   cpu_total_bytes=float(cpu_total),
                   gpu_source=f"{gpu_source}, less {GPU_HEADROOM_FRAC:.0%} headroom",
                   cpu_source=f"{cpu_source}, less {HOST_HEADROOM_FRAC:.0%} headroom")

    @classmethod
    def from_hardware(cls, hw: HardwareProfile, *, gpu_memory=None, cpu_memory=None,
                      gpu_frac: float | None = None, cpu_frac: float | None = None,
                      host_available_bytes: float | None = None) -> "Budgets":
        """The process's totals, with the headroom kept free. GPU: gpu_memory per GPU (bytes or '24GB'),
        else the profile's memory x gpu_frac (default DEFAULT_GPU_FRAC). Host: cpu_memory, else
        `host_available_bytes` (what this machine has available, found when the profile is this machine's),
        else the profile's memory x cpu_frac (default DEFAULT_CPU_FRAC). A size and a share of the same level
        are refused together: the size is the budget itself, so the share would be ignored."""
        for name, frac in (("gpu_frac", gpu_frac), ("cpu_frac", cpu_frac)):
            if frac is not None and not 0 < frac <= 1:
                raise SearchError(f"{name} must be in (0, 1], got {frac}")
        for level, size, frac in (("gpu", gpu_memory, gpu_frac), ("cpu", cpu_memory, cpu_frac)):
            if size is not None and frac is not None:
                raise SearchError(f"--{level}-memory and --{level}-frac both given: --{level}-memory is the budget "
                                  f"itself, --{level}-frac a share of the profile's memory; give one")
        n = hw.gpu.count
        if gpu_memory is not None:
            per_gpu = parse_size(gpu_memory)
            gpu, gsrc = per_gpu * n, f"user: {format_size(per_gpu)}" + (f" x {n} GPUs" if n > 1 else "")
        else:
            frac = DEFAULT_GPU_FRAC if gpu_frac is None else gpu_frac
            gpu = hw.gpu.memory_bytes * n * frac
            gsrc = f"{frac:g} x {format_size(hw.gpu.memory_bytes)}" + (f" x {n} GPUs" if n > 1 else "")
            gsrc += f" (profile {hw.name})"
        if cpu_memory is not None:
            cpu = parse_size(cpu_memory)
            csrc = f"user: {format_size(cpu)}"
        elif cpu_frac is None and (host_available_bytes := host_available_bytes or this_machine_available_bytes(hw)):
            cpu = float(host_available_bytes)
            csrc = f"this machine: {format_size(cpu)} available"
        else:
            frac = DEFAULT_CPU_FRAC if cpu_frac is None else cpu_frac
            cpu = hw.cpu.memory_bytes * frac
            csrc = f"{frac:g} x {format_size(hw.cpu.memory_bytes)} (profile {hw.name})"
        return cls.from_totals(gpu, cpu, gsrc, csrc)

    def shortfalls(self, gpu_bytes: float, cpu_bytes: float) -> list[str]:
        """One line per level whose peak exceeds its budget (the limit the search holds plans to): empty
        when both fit."""
        out = []
        for level, used, limit, src in (("GPU", gpu_bytes, self.gpu_bytes, self.gpu_source),
                                         ("CPU", cpu_bytes, self.cpu_bytes, self.cpu_source)):
            if used > limit:
                out.append(f"{level} memory needs {format_size(used)}, budget {format_size(limit)} ({src}): "
                           f"short by {format_size(used - limit)}")
        return out

    def to_dict(self) -> dict:
        return {"gpu_bytes": self.gpu_bytes, "cpu_bytes": self.cpu_bytes,
                "gpu_source": self.gpu_source, "cpu_source": self.cpu_source,
                "gpu_total_bytes": self.gpu_total_bytes, "cpu_total_bytes": self.cpu_total_bytes}


# ---------------------------------------------------------------------------------------------------
# placements

@dataclass(frozen=True)
class PlacementOption(ReadsPlacement):
    """One placement the search prices (hrm.policy.Placement: where attention and the routed experts run,
    the schedule), named, with the restrictions a baseline imposes.

    weights_gpu_frac / kv_gpu_frac: None = searched, else fixed. one_micro_batch: mu = N.
    """
    name: str
    placement: Placement
    weights_gpu_frac: float | None = None
    kv_gpu_frac: float | None = None
    one_micro_batch: bool = False

    def setting(self, spec: ModelSpec, hw: HardwareProfile, workload: Workload, *,
                pin_all_weights: bool = True, use_measured: bool = True) -> Setting:
        return Setting(spec, hw, workload, self.placement, pin_all_weights=pin_all_weights,
                       use_measured=use_measured)

    @property
    def searches_kv(self) -> bool:
        """The KV fraction on the GPU only buys time when attention runs there."""
        return self.kv_gpu_frac is None and self.attention_on_gpu

    def describe(self) -> str:
        return self.placement.describe()


ALL_PLACEMENTS = (
    PlacementOption("cpu-attention", Placement(attention_on_gpu=False, ffn_on_gpu=True, schedule="cgopipe")),
    PlacementOption("gpu-attention", Placement(attention_on_gpu=True, ffn_on_gpu=True, schedule="s4")),
    PlacementOption("cpu-attention+cpu-experts", Placement(attention_on_gpu=False, ffn_on_gpu=False, schedule="cgopipe")),
    PlacementOption("gpu-attention+cpu-experts", Placement(attention_on_gpu=True, ffn_on_gpu=False, schedule="s4")),
)
"""The whole space the cost model prices: attention on the CPU or the GPU, routed experts on the GPU
(paged) or the CPU."""

DEFAULT_PLACEMENTS = tuple(p for p in ALL_PLACEMENTS if p.ffn_on_gpu)
"""What the search emits by default: the placements the runtime executes (experts computed on the GPU).
Plans with experts on the CPU are priced when asked for (`--cpu-experts`), but runtime/ cannot run them."""


def runtime_placements(spec: ModelSpec) -> tuple[PlacementOption, ...]:
    """DEFAULT_PLACEMENTS the runtime executes for this model: a scaled 8-bit KV cache (--kv-dtype int8/fp8)
    is read by the CPU attention on the host only, so its plans keep attention there."""
    if spec.dtypes.kv_format:
        return tuple(p for p in DEFAULT_PLACEMENTS if not p.attention_on_gpu)
    return DEFAULT_PLACEMENTS


@dataclass(frozen=True)
class Problem:
    """One search request: the model, the machine, the workload and the budgets."""
    spec: ModelSpec
    hardware: HardwareProfile
    workload: Workload
    budgets: Budgets
    pin_all_weights: bool = True
    use_measured: bool = True

    def setting(self, placement: PlacementOption) -> Setting:
        return placement.setting(self.spec, self.hardware, self.workload, pin_all_weights=self.pin_all_weights,
                                 use_measured=self.use_measured)

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts


# ---------------------------------------------------------------------------------------------------
# (N, mu) enumeration

@dataclass(frozen=True)
class Resolution:
    """How finely the adaptive search enumerates (N, mu).

    Stage 1 takes every mu up to `dense` and then steps of `ratio`; for each mu, N = k * mu with k on the
    same kind of grid, plus the largest N that fits. Stage 2 refines around the `refine_top` best points:
    a box spanning the neighbouring stage-1 points, scanned with at most `refine_mu` x `refine_n` points,
    shrunk around the best until the steps are 1.
    """
    dense: int = 24
    ratio: float = 1.1
    refine_top: int = 2
    refine_mu: int = 12
    refine_n: int = 48


GRID_RESOLUTION = Resolution()
MILP_RESOLUTION = Resolution(dense=3, ratio=1.6, refine_top=1, refine_mu=4, refine_n=6)


@dataclass(frozen=True)
class Pairs:
    """An explicit, exhaustive set of (N, mu): every N with every mu <= N (and <= the memory limit)."""
    batch_sizes: tuple[int, ...]
    micro_batch_sizes: tuple[int, ...]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        N, mu = np.meshgrid(np.asarray(self.batch_sizes, np.int64), np.asarray(self.micro_batch_sizes, np.int64))
        keep = mu <= N
        return N[keep], mu[keep]


def int_grid(hi: int, dense: int, ratio: float) -> np.ndarray:
    """1..dense, then geometric steps of `ratio` up to hi (hi always included)."""
    hi = int(hi)
    if hi < 1:
        return np.zeros(0, np.int64)
    head = np.arange(1, min(dense, hi) + 1)
    if hi <= dense:
        return head.astype(np.int64)
    n = int(math.ceil(math.log(hi / dense) / math.log(ratio))) + 1
    tail = np.round(dense * ratio ** np.arange(1, n + 1)).astype(np.int64)
    return np.unique(np.concatenate([head, tail[tail < hi], [hi]])).astype(np.int64)


def span(lo: int, hi: int, points: int) -> np.ndarray:
    """Integers from lo to hi (inclusive) in equal steps, at most about `points` of them."""
    lo, hi = int(lo), int(hi)
    if hi < lo:
        return np.zeros(0, np.int64)
    step = max(1, int(math.ceil((hi - lo) / max(points - 1, 1))))
    return np.unique(np.append(np.arange(lo, hi + 1, step), hi)).astype(np.int64)


def neighbours(grid: np.ndarray, value: int) -> tuple[int, int]:
    """The grid points just below and above `value` (value itself at the ends)."""
    i = int(np.searchsorted(grid, value))
    lo = int(grid[i - 1]) if i > 0 else int(value)
    j = int(np.searchsorted(grid, value, side="right"))
    hi = int(grid[j]) if j < len(grid) else int(value)
    return lo, hi
