"""This machine as the cost model sees it: its CPU's name and its memory, read from /proc."""
from __future__ import annotations

from pathlib import Path


def local_cpu_name() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def proc_kib_bytes(key: str, path: str = "/proc/meminfo") -> int | None:
    """A 'Key:  N kB' field of a /proc file (meminfo, self/status) in bytes, or None where absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def this_machine_available_bytes(hw) -> float | None:
    """Host memory available now (MemAvailable) when `hw` describes this machine (same CPU model, total
    memory within 2%), else None: the budget a plan made here for here may take."""
    total = proc_kib_bytes("MemTotal")
    if total is None or hw.cpu.name != local_cpu_name() or abs(hw.cpu.memory_bytes - total) > 0.02 * total:
        return None
    return proc_kib_bytes("MemAvailable")
