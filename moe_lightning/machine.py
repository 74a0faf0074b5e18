"""`--hardware auto`: this machine as a hardware profile.

What is detected: the GPU (name, memory and count, through torch.cuda), the host's memory (/proc/meminfo
MemTotal), its CPU model and cores. What cannot be detected without measuring (GEMM efficiency, HBM and
link rates, CPU attention) comes from the built-in profile whose GPU matches, and the answer says which.
With no CUDA GPU, or a GPU no built-in profile describes, it is one line that says so: the cost model
prices a GPU, and `moe-lightning profile` measures a machine no profile describes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace


class MachineError(ValueError):
    """This machine cannot be described by a built-in profile; the message is one line."""


@dataclass(frozen=True)
class DetectedMachine:
    gpu_name: str | None               # None: no CUDA GPU
    gpu_memory_bytes: float
    gpu_count: int
    cpu_name: str
    cpu_cores: int
    host_memory_bytes: float | None    # MemTotal; None where /proc/meminfo is absent

    def host(self) -> str:
        from hrm.units import format_size
        memory = format_size(self.host_memory_bytes) if self.host_memory_bytes else "unknown memory"
        return f"{self.cpu_name}, {self.cpu_cores} cores, {memory} host"

    def summary(self) -> str:
        from hrm.units import format_size
        gpu = (f"{self.gpu_count} x {self.gpu_name} ({format_size(self.gpu_memory_bytes)})" if self.gpu_name
               else "no CUDA GPU")
        return f"{gpu}; {self.host()}"


def detect() -> DetectedMachine:
    """This machine, as torch.cuda, /proc/meminfo, /proc/cpuinfo and os see it."""
    from hrm.host import local_cpu_name, proc_kib_bytes

    gpu_name, gpu_memory, count = None, 0.0, 0
    try:
        import torch
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu_name, gpu_memory, count = props.name, float(props.total_memory), torch.cuda.device_count()
    except ImportError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    host = proc_kib_bytes("MemTotal")
    return DetectedMachine(gpu_name, gpu_memory, count, local_cpu_name(), cores,
                           None if host is None else float(host))


_VENDOR_WORDS = {"nvidia", "tesla", "geforce"}


def _model_words(name: str) -> list[str]:
    """'Tesla T4' -> ['t4']; 'NVIDIA A100-SXM4-40GB' -> ['a100', 'sxm4', '40gb']."""
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]


_FORM_WORDS = {"pcie", "sxm", "nvl"}


def _variant_word(word: str) -> bool:
    """A word that names a variant of a model rather than another thing: 'sxm5', '80gb', 'pcie'."""
    return word in _FORM_WORDS or any(c.isdigit() for c in word)


def gpu_matches(detected: str, detected_memory: float, profile_gpu) -> bool:
    """The same GPU: the same words once the vendor's are dropped, or the same model (the first word) with
    only variant words besides and memory within 10% (drivers name an H100 'NVIDIA H100 80GB HBM3', a
    profile 'NVIDIA H100 SXM5 80GB'; 'T4 (artifact constants)' is not a T4 machine)."""
    a, b = _model_words(detected), _model_words(profile_gpu.name)
    if not a or not b:
        return False
    if a == b:
        return True
    return (a[0] == b[0] and all(map(_variant_word, b[1:]))
            and abs(detected_memory - profile_gpu.memory_bytes) <= 0.1 * profile_gpu.memory_bytes)


def matching_profile(gpu_name: str, gpu_memory_bytes: float, gpu_count: int = 1):
    """The built-in (or MOE_LIGHTNING_PROFILES) profile of this GPU, or None: one written by `moe-lightning
    profile` (named *-measured) first, then one with measured efficiencies, then one with the same GPU
    count, then by name."""
    from hrm.hardware import available_profiles, load_profile

    found = [hw for hw in map(load_profile, available_profiles())
             if gpu_matches(gpu_name, gpu_memory_bytes, hw.gpu)]
    found.sort(key=lambda hw: (not hw.name.endswith("-measured"), hw.measured is None, hw.gpu.count != gpu_count,
                               hw.name))
    return found[0] if found else None


def auto_profile(machine: DetectedMachine | None = None):
    """(HardwareProfile of this machine, one line saying what was detected and what came from which
    profile). Raises MachineError with no CUDA GPU or no profile of this GPU."""
    from hrm.hardware import available_profiles

    m = machine or detect()
    if m.gpu_name is None:
        raise MachineError(f"--hardware auto: no CUDA GPU on this machine ({m.host()}); plans price a GPU: "
                           f"pass --hardware NAME|FILE (built-in: {', '.join(available_profiles())})")
    base = matching_profile(m.gpu_name, m.gpu_memory_bytes, m.gpu_count)
    if base is None:
        raise MachineError(f"--hardware auto: no built-in profile of this GPU ({m.gpu_name}); "
                           f"`moe-lightning profile` measures this machine, or pass --hardware NAME|FILE")
    kind = "measured efficiencies" if base.measured is not None else "datasheet rates with the efficiency model"
    cpu = replace(base.cpu, name=m.cpu_name, cores=m.cpu_cores or base.cpu.cores,
                  memory_bytes=m.host_memory_bytes or base.cpu.memory_bytes)
    gpu = replace(base.gpu, memory_bytes=m.gpu_memory_bytes, count=m.gpu_count)
    how = (f"detected {m.summary()}; {kind}, link and host rates from built-in profile {base.name} "
           f"(its GPU: {base.gpu.name})")
    hw = replace(base, name=f"auto:{base.name}", description=how, gpu=gpu, cpu=cpu, path=base.path)
    return hw, how
