"""What every probe shares: units, ProbeError, timing and data. Timing: medians of repeats after warm-up
(CUDA events around a loop of calls on the GPU, perf_counter on the CPU); data: random non-zero buffers.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch







SUSTAIN_S = 1.0
"""Seconds a compute probe runs its kernel before timing it. A whole-model prefill keeps the GPU at its
power limit for 15-30 s, and the clocks fall within the first second of that (H200, 2026-12-02 call 8:
1980 MHz idle, 1560-1725 MHz at the 700 W cap under Mixtral's MoE layer, the rate flat from the first
one-second window on); a probe of a few tens of milliseconds after two warm-up calls times the kernel
partly at boost clocks."""


def _sustain(fn: Callable[[], None], seconds: float) -> None:
    """Call `fn` (GPU work) back to back until `seconds` of wall time have passed, synchronised."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            fn()
        torch.cuda.synchronize()


def _median_cuda_s(fn: Callable[[], None], repeats: int, warmup: int = 2, target_s: float = 0.02,
                   sustain_s: float = 0.0) -> float:
    """Median seconds per call of `fn` (GPU work on the current stream), timed with CUDA events, after
    `warmup` calls and at least `sustain_s` seconds of calls (SUSTAIN_S for compute: the clocks under load)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if sustain_s > 0:
        _sustain(fn, sustain_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one_s = max(start.elapsed_time(end) / 1e3, 1e-7)
    inner = int(min(1000, max(1, math.ceil(target_s / one_s))))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _median_cpu_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_BLOCK_ELEMS = 1 << 20


def _fill_random(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Fill `t` with non-zero random values in [0.5, 1.5): exactly on the GPU, tiled from one random
    block on the CPU (memcpy speed; drawing gigabytes with `normal_` on the CPU takes minutes)."""
    flat = t.view(-1)
    n = flat.numel()
    g = torch.Generator(device=t.device).manual_seed(seed)
    if t.device.type == "cuda" or n <= _BLOCK_ELEMS:
        flat.copy_(torch.rand(n, generator=g, device=t.device).add_(0.5))
        return t
    block = torch.rand(_BLOCK_ELEMS, generator=g).add_(0.5).to(t.dtype)
    full = n // _BLOCK_ELEMS
    flat[:full * _BLOCK_ELEMS].view(full, _BLOCK_ELEMS).copy_(block)   # broadcast over rows
    flat[full * _BLOCK_ELEMS:].copy_(block[:n - full * _BLOCK_ELEMS])
    return t


class ProbeError(ValueError):
    """A profile that cannot be produced here (the message says what to pass instead)."""
