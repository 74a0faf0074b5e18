"""What a run measured: per-stage seconds (CUDA events on the GPU streams, wall clock on the CPU worker),
prefill/decode seconds, tokens/s and memory peaks, as a frozen `Measurement` with a JSON round trip.

Stages: gpu_compute (pre/post-attention, GPU attention, LM head), cpu_attention (KV append + attention
in the worker), h2d_weights, h2d_hidden (attention outputs, prefill hidden states), h2d_kv (s4), d2h
(q/k/v, KV and hidden offload). Stage spans overlap in time; their sum is not the wall time.
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from hrm.atomic import atomic_write_text

STAGES = ("gpu_compute", "cpu_attention", "h2d_weights", "h2d_hidden", "h2d_kv", "d2h")
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class StageTime:
    phase: str             # prefill | decode
    name: str              # one of STAGES
    total_s: float         # summed span durations
    count: int             # spans

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0


@dataclass(frozen=True)
class Span:
    phase: str
    stage: str
    label: str             # e.g. "L3 mb1" or "L3 p0"
    start_s: float         # seconds since the recorder started
    end_s: float


class Recorder:
    """Collects spans. GPU spans are CUDA event pairs on a stream (resolved in `finish`); host spans (and
    every span without CUDA) use perf_counter. Host and GPU clocks are aligned at `start`."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.phase = "prefill"
        self._lock = threading.Lock()
        self._events: list[tuple[str, str, str, object, object]] = []
        self._spans: list[Span] = []
        self._t0 = time.perf_counter()
        self._base = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
        self._t0 = time.perf_counter()

    @contextmanager
    def gpu(self, stage: str, stream, label: str = ""):
        """A span of work enqueued on `stream` (None on the CPU)."""
        if not self.enabled:
            yield
            return
        if not self.cuda:
            with self.host(stage, label):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._events.append((self.phase, stage, label, start, end))

    @contextmanager
    def host(self, stage: str, label: str = "", phase: str | None = None):
        """A span of host work (thread-safe: the attention worker records here)."""
        phase = phase or self.phase
        t0 = time.perf_counter()
        yield
        t1 = time.perf_counter()
        if self.enabled:
            with self._lock:
                self._spans.append(Span(phase, stage, label, t0 - self._t0, t1 - self._t0))

    def finish(self) -> list[Span]:
        """All spans, GPU events resolved (synchronises the device)."""
        if self.cuda:
            torch.cuda.synchronize()
            for phase, stage, label, s, e in self._events:
                t0 = self._base.elapsed_time(s) / 1e3
                self._spans.append(Span(phase, stage, label, t0, t0 + s.elapsed_time(e) / 1e3))
            self._events = []
        return sorted(self._spans, key=lambda sp: sp.start_s)


ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# The runtime's own allocator setting where the environment names none: one expandable segment per pool
# grows and shrinks by mapping pages, so blocks freed between prefill's and decode's differently sized
# workspaces coalesce instead of staying reserved (calls 5-6 of 2026-12-02 kept 0.8-2.3 GiB reserved
# beyond what tensors held without it).
DEFAULT_ALLOCATOR = "expandable_segments:True"


def configure_allocator() -> None:
    """Give the caching allocator DEFAULT_ALLOCATOR unless the environment configures it (the user's choice
    wins); applies to the segments reserved after the call. No-op without CUDA."""
    if any(os.environ.get(k) for k in ALLOCATOR_ENV) or not torch.cuda.is_available():
        return
    torch.cuda.memory._set_allocator_settings(DEFAULT_ALLOCATOR)


def allocator_conf() -> str:
    """The caching allocator's configuration ("NAME=value; ..." as the environment gave it, else the
    runtime's default, "" without CUDA): it sets how much the allocator reserves beyond what tensors hold
    (hrm.memory's allocator_slack)."""
    given = "; ".join(f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV if os.environ.get(k))
    if given or not torch.cuda.is_available():
        return given
    return f"runtime default {DEFAULT_ALLOCATOR}"


def stage_times(spans: list[Span]) -> tuple[StageTime, ...]:
    totals: dict[tuple[str, str], list[float]] = {}
    for sp in spans:
        totals.setdefault((sp.phase, sp.stage), []).append(sp.end_s - sp.start_s)
    return tuple(StageTime(p, s, sum(totals[p, s]), len(totals[p, s]))
                 for p in PHASES for s in STAGES if (p, s) in totals)


@dataclass(frozen=True)
class Measurement:
    plan_id: str
    model: str
    policy: str
    device: str
    num_sequences: int
    prompt_tokens: int                 # real prompt tokens (padding excluded)
    generated_tokens: int              # all new tokens (the first comes from prefill)
    decode_tokens: int                 # new tokens produced by decode steps
    prefill_s: float
    decode_s: float
    decode_layer_steps: int            # layers x decode steps, summed over passes
    stages: tuple[StageTime, ...]
    gpu_peak_bytes: int                # the process's GPU peak: CUDA context + the allocator's reserved peak
    cpu_peak_bytes: int                # process peak resident set
    pinned_bytes: int                  # page-locked host bytes at the end of the run
    setup_s: float = 0.0               # per pass before prefill (cache and staging layout, inputs); not in total_s
    memory_phases: tuple = ()          # runtime.memory.PhaseMemory as dicts: load, reserve, prefill, decode
    account_bytes: dict | None = None  # hrm.memory.MemoryUse.to_dict() of the last pass as laid out
    allocated_bytes: dict | None = None  # what the runtime's tensors hold, by the account's level and part
    allocator: str = ""                # how PyTorch's CUDA caching allocator was configured (its env), "" default

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """End to end: generated tokens over prefill + decode time."""
        return self.generated_tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def stage(self, name: str, phase: str = "decode") -> StageTime:
        for st in self.stages:
            if st.phase == phase and st.name == name:
                return st
        return StageTime(phase, name, 0.0, 0)

    def per_layer_step_s(self, name: str) -> float:
        """Decode seconds of one stage per layer-step (one layer for all micro-batches of one token)."""
        return self.stage(name).total_s / self.decode_layer_steps if self.decode_layer_steps else 0.0

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        d["derived"] = {"total_s": self.total_s, "tokens_per_s": self.tokens_per_s,
                        "decode_tokens_per_s": self.decode_tokens_per_s}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["stages"] = tuple(StageTime(**s) for s in d["stages"])
        kw["memory_phases"] = tuple(kw.get("memory_phases", ()))
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Measurement":
        return cls.from_dict(json.loads(text))

    def write(self, path: str | Path) -> None:
        """Write atomically (temporary file in the same directory, then os.replace)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> "Measurement":
        return cls.from_json(Path(path).read_text())
