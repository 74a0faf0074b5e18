"""Host (CPU) tensors, page-locked when CUDA is present.

Large buffers are pinned in place with cudaHostRegister: torch's caching host allocator rounds every
pinned block up to a power of two (a 70 GB request would pin 128 GB). Without CUDA nothing is pinned.
A large buffer's pages are first touched by torch's parallel fill (every core faults its share), since
cudaHostRegister faults untouched pages in on one thread: `benchmarks/pin_rate.py` measures both ways.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref

import torch

PRETOUCH_MIN_BYTES = 64 * 2**20
HUGEPAGES_ENV = "MOE_LIGHTNING_HOST_HUGEPAGES"
"""Set to 1: large host buffers are advised for transparent huge pages (madvise MADV_HUGEPAGE) before their
pages are first touched, an A/B of whether 4 KiB pages slow the CPU attention's reads of the KV cache when
most of the host memory is pinned (H200 2026-12-02: calls 9-28% slower in whole runs than in the probe)."""
_MADV_HUGEPAGE = 14
_HUGE = 2 * 2**20
_lock = threading.Lock()
_pinned_bytes = 0


def pinned_bytes() -> int:
    """Bytes currently pinned through `empty_host`."""
    return _pinned_bytes


def _account(delta: int) -> None:
    global _pinned_bytes
    with _lock:
        _pinned_bytes += delta


def _unregister(ptr: int, nbytes: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)
    _account(-nbytes)


def empty_host(shape: tuple[int, ...], dtype: torch.dtype, pin: bool | None = None) -> torch.Tensor:
    """An uninitialised CPU tensor; page-locked (exact size) when `pin` (default: CUDA is available)."""
    t = torch.empty(shape, dtype=dtype)
    if pin is None:
        pin = torch.cuda.is_available()
    nbytes = t.numel() * t.element_size()
    if pin and nbytes:
        if nbytes >= PRETOUCH_MIN_BYTES:
            if os.environ.get(HUGEPAGES_ENV) == "1":
                advise_hugepages(t.data_ptr(), nbytes)
            t.view(-1).view(torch.uint8).zero_()
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise MemoryError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed with CUDA error {int(err)}")
        _account(nbytes)
        weakref.finalize(t, _unregister, t.data_ptr(), nbytes)
    return t


def advise_hugepages(ptr: int, nbytes: int) -> bool:
    """madvise(MADV_HUGEPAGE) over the whole 2 MiB pages inside [ptr, ptr + nbytes); False where the OS
    refuses or is not Linux (the advice is optional: nothing else changes)."""
    start = -(-ptr // _HUGE) * _HUGE
    length = (ptr + nbytes - start) // _HUGE * _HUGE
    if not sys.platform.startswith("linux") or length <= 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0


class HostArena:
    """One host buffer reused across passes: `take(n)` returns its first n elements, reallocating (pinned
    when `pin`) only when a pass needs more than it holds. A new buffer is zeroed once; later passes find
    what earlier ones wrote (finite values), so readers of unwritten elements under a mask see 0 * finite,
    never uninitialised memory (0 * NaN)."""

    def __init__(self, dtype: torch.dtype, pin: bool):
        self.dtype, self.pin = dtype, pin
        self._buf = torch.empty(0, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self._buf.numel() * self._buf.element_size()

    def extra_bytes(self, numel: int) -> int:
        """Bytes `take(numel)` would allocate (0 when the buffer is large enough)."""
        return max(0, numel - self._buf.numel()) * self._buf.element_size()

    def take(self, numel: int) -> torch.Tensor:
        if numel > self._buf.numel():
            self._buf = torch.empty(0, dtype=self.dtype)     # release first: never both pinned at once
            self._buf = empty_host((numel,), self.dtype, self.pin)
            self._buf.zero_()
        return self._buf[:numel]
