"""The runtime's side of the memory account (hrm.memory): the account of a pass as laid out, what this
process can have, the check before allocating, and measured peaks per phase.

    account = pass_account(spec, policy, micro_batches, num_device, max_new, machine)
    check(account, machine)                      # DoesNotFit (one line naming the part) before allocating
    meter.phase("prefill"); ...; meter.end()     # peaks: GPU allocated / reserved / process, host RSS, pinned
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from hrm.host import proc_kib_bytes
from hrm.memory import MemoryProfile, MemoryUse, PassShape, account
from hrm.units import format_size
from hrm.policy import Policy
from hrm.spec import ModelSpec

from .host_memory import pinned_bytes
from .packing import MicroBatch



class DoesNotFit(MemoryError):
    """The placement needs more memory than the machine has (one line naming the part and the numbers)."""


# ---- this process and this machine ------------------------------------------------------------------

def _status_bytes(key: str) -> int:
    return proc_kib_bytes(key, "/proc/self/status") or 0


def rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    return _status_bytes("VmRSS")


def rss_peak_bytes() -> int:
    """This process's resident-set peak since it started or since `reset_rss_peak` (VmHWM)."""
    return _status_bytes("VmHWM")


def reset_rss_peak() -> None:
    """Start a new resident-set peak (Linux: writing 5 to clear_refs); without it the peak stays the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def available_host_bytes() -> int:
    """MemAvailable (else physical pages free)."""
    avail = proc_kib_bytes("MemAvailable")
    return avail or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Machine:
    """What this process may hold: GPU bytes (the budget, or the device's memory) and host bytes (what it
    holds now plus what the machine has available), and the sizes of the stack measured in this process."""
    gpu_bytes: int
    host_bytes: int
    profile: MemoryProfile       # the CUDA context and the baseline as measured here; the allocator slack given
    cuda: bool = True            # False: the device is the CPU, and the 'GPU' parts are host memory too
    gpu_budget: bool = False     # gpu_bytes is an emulated budget

    @classmethod
    def measure(cls, device: torch.device, gpu_budget_bytes: int | None = None,
                profile: MemoryProfile | None = None) -> "Machine":
        """Measure now, before any model buffer: the process's resident set is its baseline, and on a GPU
        the device memory in use beyond the allocator's blocks is the CUDA context (the device is ours). The
        context grows once kernels load: where the plan's profile measured a larger one, that one counts."""
        frac = (profile or MemoryProfile()).gpu_allocator_frac
        rss = rss_bytes()
        host = available_host_bytes() + rss
        if device.type != "cuda":
            return cls(host, host, MemoryProfile(0.0, float(rss), frac, True, "measured in this process"), cuda=False)
        torch.empty(1, device=device)            # the context exists
        free, total = torch.cuda.mem_get_info(device)
        context = max(0, total - free - torch.cuda.memory_reserved(device))
        if profile is not None and profile.measured:
            context = max(context, profile.cuda_context_bytes)
        gpu = int(gpu_budget_bytes) if gpu_budget_bytes else int(total)
        return cls(gpu, host, MemoryProfile(float(context), float(rss), frac, True, "measured in this process"),
                   gpu_budget=bool(gpu_budget_bytes))


# ---- the account of a pass -------------------------------------------------------------------------

def pass_shape(micro_batches: tuple[MicroBatch, ...], num_device: int, chunks, max_new_tokens: int) -> PassShape:
    """The PassShape of a laid-out pass; `chunks`: per micro-batch its prefill chunks (ranges of rows)."""
    per_chunk = [(sum(mb.prefill_lens[r] for r in rows), len(rows), len(rows) * mb.prefill_len)
                 for mb, rows_of_mb in zip(micro_batches, chunks) for rows in rows_of_mb]
    return PassShape.of_layout([mb.size for mb in micro_batches], [mb.kv_slots for mb in micro_batches],
                               max(mb.capacity for mb in micro_batches), num_device, per_chunk, max_new_tokens)


def policy_account(spec: ModelSpec, policy: Policy, shape: PassShape, profile: MemoryProfile,
                   num_gpus: int = 1) -> MemoryUse:
    """hrm.memory.account for a policy as the runtime realises it (whole experts)."""
    r_w = policy.resident_experts(spec.num_experts) / spec.num_experts
    return account(spec, shape, r_w, profile=profile, num_gpus=num_gpus, attention_on_gpu=policy.attention_on_gpu,
                   ffn_on_gpu=policy.ffn_on_gpu, schedule=policy.schedule).floats()


def check(need: MemoryUse, machine: Machine, what: str) -> None:
    """Raise DoesNotFit when the account exceeds what the process may hold, naming the first part (in the
    account's order) that does not fit. Without CUDA the 'GPU' is host memory too."""
    host_parts = list(need.pinned.items()) + list(need.pageable.items())
    if machine.cuda:
        levels = [("GPU", list(need.gpu.items()), machine.gpu_bytes), ("host", host_parts, machine.host_bytes)]
    else:
        levels = [("host", list(need.gpu.items()) + host_parts, machine.host_bytes)]
    for level, parts, capacity in levels:
        total = sum(v for _, v in parts)
        if total <= capacity:
            continue
        running = 0.0
        for name, v in parts:
            running += v
            if running > capacity:
                break
        where = " within the budget" if level == "GPU" and machine.gpu_budget else ""
        raise DoesNotFit(f"{what}: {level} memory needs {format_size(total)} but {format_size(capacity)} is "
                         f"available{where}; {name} ({format_size(v)}) does not fit")


# ---- measured peaks -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhaseMemory:
    """Measured peaks of one phase (setup: weights and host buffers; prefill; decode)."""
    phase: str
    gpu_allocated_peak_bytes: int
    gpu_reserved_peak_bytes: int
    gpu_process_peak_bytes: int      # the CUDA context + the allocator's reserved peak
    host_rss_peak_bytes: int
    pinned_bytes: int                # page-locked by the runtime at the phase's end
    wall_s: float = 0.0              # the phase's wall time (load: weights placed and filled; reserve: host
    #                                  buffers pinned; prefill and decode of the measured passes)
    gpu_alloc_retries: int = 0       # times the caching allocator found no memory, freed its cache and retried
    #                                  (each a device synchronisation that stalls the pipeline)


class MemoryMeter:
    """Per-phase peaks of this process: GPU through torch's allocator statistics, host through VmHWM."""

    def __init__(self, device: torch.device, context_bytes: float):
        self.device, self.context = device, int(context_bytes)
        self.phases: list[PhaseMemory] = []
        self._open: str | None = None
        self._started = 0.0
        self._retries = 0

    def phase(self, name: str) -> None:
        self.end()
        self._open, self._started = name, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._retries = _alloc_retries(self.device)
        reset_rss_peak()

    def end(self) -> None:
        if self._open is None:
            return
        alloc = reserved = process = retries = 0
        if self.device.type == "cuda":
            retries = _alloc_retries(self.device) - self._retries
            torch.cuda.synchronize(self.device)
            alloc = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            # the context grows as kernels load and libraries make their handles: read it now, as the
            # device's use beyond the allocator's blocks (the device is this process's)
            free, total = torch.cuda.mem_get_info(self.device)
            self.context = max(self.context, total - free - torch.cuda.memory_reserved(self.device))
            process = self.context + reserved
        self.phases.append(PhaseMemory(self._open, alloc, reserved, process, rss_peak_bytes(), pinned_bytes(),
                                       time.perf_counter() - self._started, retries))
        self._open = None

    def take(self) -> tuple[PhaseMemory, ...]:
        """The phases measured since the last take."""
        self.end()
        out, self.phases = tuple(self.phases), []
        return out


def _alloc_retries(device: torch.device) -> int:
    """The caching allocator's cudaMalloc retries so far (a counter torch never resets with the peaks)."""
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def phase_dicts(phases) -> list[dict]:
    return [asdict(p) for p in phases]
