"""Machines as data: `HardwareProfile` loaded from `hrm/hardware_profiles/*.toml` (package data).

Files use human units (GB/s, TFLOP/s, GiB) with the unit in the key; they are converted to SI once,
here, on load. Every section carries a `source` string (datasheet, paper, or a measurement's method
and date).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np

from .checks import MAX_BYTES, load_json, need, number, read_text
from .formats import SCALED_KV_FORMATS
from .memory import MemoryProfile
from .profile_keys import MEMORY_KEYS, misplaced_or_unknown_key, unit_of


PROFILE_DIR = Path(__file__).resolve().with_name("hardware_profiles")


class HardwareError(ValueError):
    """A profile that cannot be used (the message names the file and the field)."""


@dataclass(frozen=True)
class ComputeUnit:
    """One processor and the memory next to it (a GPU with its HBM, or the CPU with DRAM)."""
    name: str
    memory_bytes: float
    mem_bytes_per_s: float
    peak_flops: Mapping[str, float]   # by dtype name: "bf16", "fp16", "fp32"
    count: int = 1                    # GPUs on the host (tensor parallel), 1 for the CPU
    cores: int = 0
    source: str = ""

    def flops_per_s(self, dtype: str) -> float:
        key = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
        if key in self.peak_flops:
            return self.peak_flops[key]
        if key == "bf16" and "fp16" in self.peak_flops:   # e.g. T4: no bf16 units, fp16 path
            return self.peak_flops["fp16"]
        if "fp32" in self.peak_flops:
            return self.peak_flops["fp32"]
        raise HardwareError(f"{self.name}: no peak FLOP/s for {dtype}")


@dataclass(frozen=True)
class Link:
    """One CPU-GPU link; a host has count / gpus_per_link of them (1: a link per GPU; count: one switch)."""
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    duplex_bytes_per_s: float        # total of both directions when both run at once
    pageable_h2d_bytes_per_s: float = 0.0
    source: str = ""
    gpus_per_link: int = 1
    peer_bytes_per_s: float = 0.0    # one GPU to another (NVLink, or PCIe peer to peer); 0: not measured

    @property
    def gpu_to_gpu_bytes_per_s(self) -> float:
        """What the tensor-parallel all-reduces run at: the measured peer rate, else the host link's."""
        return self.peer_bytes_per_s or self.h2d_bytes_per_s

    @property
    def duplex_frac(self) -> float:
        """How much of the one-way rates survives when both directions run at once (1 = full duplex)."""
        return min(1.0, self.duplex_bytes_per_s / (self.h2d_bytes_per_s + self.d2h_bytes_per_s))


@dataclass(frozen=True)
class Measured:
    """Optional micro-benchmark results that replace datasheet peaks in the cost model.

    Curves are (x, y) pairs interpolated in log(x): the GPU GEMM rate by tokens per expert GEMM, the
    H2D rate by transfer size. Scalars are rates of the runtime's own kernels.
    """
    gpu_gemm_tokens: tuple[float, ...] = ()
    gpu_gemm_flops_per_s: tuple[float, ...] = ()
    h2d_sizes_bytes: tuple[float, ...] = ()
    gpu_moe_shapes: tuple[tuple[int, int, int, int], ...] = ()  # the runtime's MoE layer measured at these
    #   expert shapes (hidden, intermediate, experts, top-k) ...
    gpu_moe_tokens_per_expert: tuple[tuple[float, ...], ...] = ()  # ... per shape: tokens per expert ...
    gpu_moe_flops_per_s: tuple[tuple[float, ...], ...] = ()              # ... and routed top-k FLOP/s
    gpu_prefill_tokens: tuple[float, ...] = ()  # the runtime's prefill layer: tokens per chunk ...
    gpu_prefill_rest_flops_per_s: tuple[float, ...] = ()  # ... and FLOP/s of all but its routed experts
    gpu_prefill_rest_shapes: tuple[tuple[int, int, int], ...] = ()  # the same measured at these attention
    #   shapes (hrm.rates.attention_shape) of several models (priced before the one-model curve above) ...
    gpu_prefill_rest_tokens_by_shape: tuple[tuple[float, ...], ...] = ()  # ... per shape: tokens per chunk ...
    gpu_prefill_rest_flops_per_s_by_shape: tuple[tuple[float, ...], ...] = ()   # ... and FLOP/s of the rest
    prefill_pass_s_per_token: float = 0.0       # the runtime's prefill cost per prompt token paid once per pass
    h2d_bytes_per_s: tuple[float, ...] = ()
    cpu_attention_bytes_per_s: float = 0.0     # KV bytes/s of the runtime's CPU decode attention
    cpu_attention_overlapped_bytes_per_s: float = 0.0  # the same inside the pipelined decode loop (host shared)
    cpu_attention_overlapped_micro_batches: tuple[float, ...] = ()   # ... where measured by micro-batch size:
    cpu_attention_overlapped_by_micro_batch: tuple[float, ...] = ()  # ... sizes and KV bytes/s
    cpu_attention_loop_shapes: tuple[tuple[float, float, float], ...] = ()  # in-loop calls measured at
    #   (sequences, KV slots read per sequence, bytes per slot) ...
    cpu_attention_loop_call_s: tuple[float, ...] = ()  # ... and their seconds per call
    cpu_dram_bytes_per_s: float = 0.0
    cpu_dram_copy_bytes_per_s: float = 0.0     # memcpy within host DRAM (bytes copied per second)
    gpu_hbm_bytes_per_s: float = 0.0
    decode_visit_s: float = 0.0                # the runtime's fixed cost of one micro-batch visit of a layer
    decode_visit_s_by_schedule: tuple[tuple[str, float], ...] = ()   # the same per schedule, where measured
    decode_visit_s_grouped_by_schedule: tuple[tuple[str, float], ...] = ()  # micro-batches above ...
    grouped_above_tokens: int = 0              # ... this many tokens (the runtime's grouped MoE path)
    cpu_attention_call_s: float = 0.0          # fixed cost of one CPU attention call (hand-off, masks, append)
    cpu_attention_time_of_compute_by_kv_format: tuple[tuple[str, float], ...] = ()  # per scaled 8-bit KV
    #   format, its CPU attention's time per call over the compute dtype's (hrm.formats.KVFormat's default)
    cpu_attention_loop_time_of_compute_by_kv_format: tuple[tuple[str, float], ...] = ()  # the same of the
    #   calls inside the decode loop (what the loop fit of the compute dtype's calls is scaled by)
    method: str = ""
    date: str = ""

    def gemm_flops_per_s(self, tokens: float, default: float) -> float:
        return _interp_log(tokens, self.gpu_gemm_tokens, self.gpu_gemm_flops_per_s, default)

    def h2d_rate(self, size_bytes: float, default: float) -> float:
        return _interp_log(size_bytes, self.h2d_sizes_bytes, self.h2d_bytes_per_s, default)


MEASURED_RENAMED = {"gpu_gemm_flops": "gpu_gemm_flops_per_s", "gpu_moe_flops": "gpu_moe_flops_per_s",
                    "gpu_prefill_rest_flops": "gpu_prefill_rest_flops_per_s"}
"""Measured fields under their names before 2026-12-02 (rates named *_per_s): plan files written before then
carry them."""


def measured_fields_renamed(d: Mapping) -> dict:
    """A serialised Measured with its fields under today's names."""
    return {MEASURED_RENAMED.get(k, k): v for k, v in d.items()}


@lru_cache(maxsize=4)
def _basis_errors(path: Path) -> dict | None:
    """benchmarks/basis_error.py's summary at `path`, read once; None where there is none."""
    if not path.is_file():
        return None
    return load_json(read_text(path, "basis errors", HardwareError), str(path), HardwareError)


def interp_log(x, xs, ys):
    """A measured curve (xs ascending, positive) read at x, interpolated in log(x) and held flat beyond
    the measured range; numpy-broadcast over x."""
    return np.interp(np.log(np.maximum(np.asarray(x, float), 1e-30)), np.log(np.asarray(xs, float)),
                     np.asarray(ys, float))


def _interp_log(x, xs, ys, default):
    return float(interp_log(x, xs, ys)) if xs else default


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    gpu: ComputeUnit
    cpu: ComputeUnit
    link: Link
    measured: Measured | None = None
    path: str = ""
    memory: MemoryProfile = MemoryProfile()

    @property
    def num_links(self) -> int:
        """Independent CPU-GPU links: the host moves this many times one link's rate at once."""
        return max(1, -(-self.gpu.count // self.link.gpus_per_link))

    def basis(self, use_measured: bool = True) -> str:
        """What a prediction with this profile rests on: measurements of that machine, published
        measurements of it, or datasheet figures plus the efficiency model (also when `use_measured` is off)."""
        m = self.measured
        if m is None or not use_measured:
            why = "nothing measured on that machine" if m is None else "the profile's measurements not used"
            return f"datasheet plus efficiency model (hrm/efficiency.py; {why})"
        if m.method.startswith("published"):
            return f"{m.method} ({m.date}); datasheet plus efficiency model elsewhere"
        return f"measured on the profiled machine: {m.method} ({m.date})"

    def measured_here(self, use_measured: bool = True) -> bool:
        """Whether predictions rest on measurements of the profiled machine itself (see `basis`)."""
        m = self.measured
        return bool(use_measured and m is not None and not m.method.startswith("published"))

    def uncertainty(self, use_measured: bool = True) -> dict | None:
        """How far predictions on this basis missed on the committed whole-model runs
        (hardware_profiles/basis_error.json, benchmarks/basis_error.py): the misses with the profile's
        measurements for a profile measured on its machine, else those of its unit-level rates with the
        efficiency model (the measured machine priced as if unmeasured). None where the file is absent."""
        data = _basis_errors(PROFILE_DIR / "basis_error.json")
        if data is None:
            return None
        band = data.get("measured" if self.measured_here(use_measured) else "efficiency_model")
        if band is None:                       # a file written before the efficiency model
            return None
        return {**band, "source": f"{data['machine']}, {data['date']}, {', '.join(data['runs'])}"}

    def uncertainty_line(self, use_measured: bool = True) -> str | None:
        u = self.uncertainty(use_measured)
        return None if u is None else (
            f"uncertainty: predictions on this basis missed by a median of {u['median_abs_pct']:.0f}% (90th "
            f"percentile {u['p90_abs_pct']:.0f}%, worst {u['max_abs_pct']:.0f}%) on {u['runs']} whole-model "
            f"runs ({u['source'].split(',')[0]}; benchmarks/basis_error.py)")

    def with_gpu_memory(self, memory_bytes: float) -> "HardwareProfile":
        return replace(self, gpu=replace(self.gpu, memory_bytes=float(memory_bytes)))

    def with_cpu_memory(self, memory_bytes: float) -> "HardwareProfile":
        return replace(self, cpu=replace(self.cpu, memory_bytes=float(memory_bytes)))

    def scaled(self, *, link: float = 1.0, cpu_mem_bw: float = 1.0, gpu_flops: float = 1.0) -> "HardwareProfile":
        """A what-if machine: multiply the link, CPU DRAM bandwidth or GPU FLOP/s."""
        lk = self.link
        return replace(
            self,
            name=f"{self.name}(what-if)",
            link=replace(lk, h2d_bytes_per_s=lk.h2d_bytes_per_s * link, d2h_bytes_per_s=lk.d2h_bytes_per_s * link,
                         duplex_bytes_per_s=lk.duplex_bytes_per_s * link),
            cpu=replace(self.cpu, mem_bytes_per_s=self.cpu.mem_bytes_per_s * cpu_mem_bw),
            gpu=replace(self.gpu, peak_flops={k: v * gpu_flops for k, v in self.gpu.peak_flops.items()}),
            measured=None if self.measured is None else replace(
                self.measured, h2d_bytes_per_s=tuple(v * link for v in self.measured.h2d_bytes_per_s),
                gpu_gemm_flops_per_s=tuple(v * gpu_flops for v in self.measured.gpu_gemm_flops_per_s),
                gpu_moe_flops_per_s=tuple(tuple(v * gpu_flops for v in curve) for curve in self.measured.gpu_moe_flops_per_s),
                gpu_prefill_rest_flops_per_s=tuple(v * gpu_flops for v in self.measured.gpu_prefill_rest_flops_per_s),
                gpu_prefill_rest_flops_per_s_by_shape=tuple(tuple(v * gpu_flops for v in curve)
                                                      for curve in self.measured.gpu_prefill_rest_flops_per_s_by_shape),
                cpu_dram_bytes_per_s=self.measured.cpu_dram_bytes_per_s * cpu_mem_bw,
                cpu_dram_copy_bytes_per_s=self.measured.cpu_dram_copy_bytes_per_s * cpu_mem_bw,
                cpu_attention_bytes_per_s=self.measured.cpu_attention_bytes_per_s * cpu_mem_bw,
                cpu_attention_overlapped_bytes_per_s=self.measured.cpu_attention_overlapped_bytes_per_s * cpu_mem_bw,
                cpu_attention_overlapped_by_micro_batch=tuple(
                    v * cpu_mem_bw for v in self.measured.cpu_attention_overlapped_by_micro_batch),
                cpu_attention_loop_call_s=tuple(v / cpu_mem_bw for v in self.measured.cpu_attention_loop_call_s)),
        )


# ---------------------------------------------------------------------------------------------------
# loading

def _req(table: Mapping, key: str, where: str):
    if not isinstance(table, Mapping):
        raise HardwareError(f"{where}: must be a table")
    if key not in table:
        raise HardwareError(f"{where}: missing field '{key}'")
    return table[key]


def _memory_bytes(table: Mapping, where: str) -> float:
    if "memory_gib" in table and "memory_gb" in table:
        raise HardwareError(f"{where}: give 'memory_gib' or 'memory_gb', not both")
    for key in ("memory_gib", "memory_gb"):
        if key in table:
            return _positive(table[key], key, where, high=MAX_BYTES / unit_of(key)) * unit_of(key)
    raise HardwareError(f"{where}: missing field 'memory_gib' (or 'memory_gb')")


def _by_name(table, key: str, where: str, known, what: str, example: str) -> tuple[tuple[str, float], ...]:
    """{name = number} -> ((name, number in SI), ...), every name one of `known` (what they are: `what`)."""
    if not isinstance(table, Mapping):
        raise HardwareError(f"{where}: '{key}' must be a table like {{ {example} }}, got {table!r}")
    odd = [k for k in table if k not in known]
    if odd:
        raise HardwareError(f"{where}: '{key}' names unknown {what}(s) {odd}; known: {', '.join(known)}")
    return tuple((k, _positive(v, f"{key}.{k}", where) * unit_of(key)) for k, v in table.items())


def _by_schedule(table, key: str, where: str) -> tuple[tuple[str, float], ...]:
    from .schedules import SCHEDULES
    return _by_name(table, key, where, SCHEDULES, "schedule", "cgopipe = 1500")


def _si(table: Mapping, key: str, where: str) -> float:
    """An optional measured number in SI (profile_keys.unit_of): finite and not negative, 0 where absent."""
    return number(table.get(key, 0.0), f"{where}: '{key}'", err=HardwareError) * unit_of(key)


def _positive(value, key: str, where: str, high: float | None = None) -> float:
    return number(value, f"{where}: '{key}'", err=HardwareError, positive=True, high=high)


def _gpus_per_link(lk: Mapping, gpu: Mapping, where: str) -> int:
    """[link] gpus_per_link: a whole number from 1 to [gpu] count (default 1, a link per GPU)."""
    value, count = lk.get("gpus_per_link", 1), gpu.get("count", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max(1, int(count)):
        raise HardwareError(f"{where}: 'gpus_per_link' must be a whole number from 1 to the GPU count ({count}), "
                            f"got {value!r}")
    return value


def _unit(table: Mapping, where: str) -> ComputeUnit:
    tflops = _req(table, "tflops", where)
    if not isinstance(tflops, Mapping) or not tflops:
        raise HardwareError(f"{where}: 'tflops' must be a table such as {{ bf16 = 65, fp32 = 8 }}")
    return ComputeUnit(
        name=str(_req(table, "name", where)),
        memory_bytes=_positive(_memory_bytes(table, where), "memory", where),
        mem_bytes_per_s=_positive(_req(table, "mem_gb_per_s", where), "mem_gb_per_s", where) * unit_of("mem_gb_per_s"),
        peak_flops={k: _positive(v, f"tflops.{k}", where) * unit_of("tflops") for k, v in tflops.items()},
        count=number(table.get("count", 1), f"{where}: 'count'", err=HardwareError, integer=True, positive=True),
        cores=number(table.get("cores", 0), f"{where}: 'cores'", err=HardwareError, integer=True),
        source=str(_req(table, "source", where)),
    )


def _measured(table: Mapping, where: str) -> Measured:
    def pair(xkey, ykey):
        xs, ys = ([_positive(v, key, where) for v in need(table.get(key, []), list, f"{where}: '{key}'", HardwareError)]
                  for key in (xkey, ykey))
        if len(xs) != len(ys):
            raise HardwareError(f"{where}: '{xkey}' and '{ykey}' differ in length")
        order = np.argsort(xs)
        return tuple(xs[i] * unit_of(xkey) for i in order), tuple(ys[i] * unit_of(ykey) for i in order)

    gt, gf = pair("gpu_gemm_tokens", "gpu_gemm_tflops")
    hs, hr = pair("h2d_sizes_mib", "h2d_gb_per_s")
    for old, new in (("gpu_moe_tokens", "gpu_moe_shapes"), ("gpu_prefill_tflops", "gpu_prefill_rest_tflops")):
        if old in table:
            raise HardwareError(f"{where}: '{old}' is the old form of '{new}' (measured at Mixtral's shape only); "
                                f"re-run `moe-lightning profile`")
    shapes, moe_x, moe_y = _curves_by_shape(table, "gpu_moe_shapes", "gpu_moe_tokens_per_expert", "gpu_moe_tflops",
                                            ("hidden", "intermediate", "experts", "top_k"), where)
    rest_shapes, rest_x, rest_y = _curves_by_shape(table, "gpu_prefill_rest_shapes", "gpu_prefill_rest_tokens_by_shape",
                                                   "gpu_prefill_rest_tflops_by_shape", ("hidden", "q_dim", "kv_elems"),
                                                   where)
    pt, pf = pair("gpu_prefill_tokens", "gpu_prefill_rest_tflops")
    om, ob = pair("cpu_attention_overlapped_micro_batches", "cpu_attention_overlapped_gb_per_s_by_micro_batch")
    loop_shapes, loop_s = _attention_loop(table, where)
    return Measured(
        gpu_gemm_tokens=gt, gpu_gemm_flops_per_s=gf, h2d_sizes_bytes=hs, h2d_bytes_per_s=hr,
        gpu_moe_shapes=shapes, gpu_moe_tokens_per_expert=moe_x, gpu_moe_flops_per_s=moe_y,
        gpu_prefill_tokens=pt, gpu_prefill_rest_flops_per_s=pf, gpu_prefill_rest_shapes=rest_shapes,
        gpu_prefill_rest_tokens_by_shape=rest_x, gpu_prefill_rest_flops_per_s_by_shape=rest_y,
        prefill_pass_s_per_token=_si(table, "prefill_pass_ns_per_token", where),
        cpu_attention_bytes_per_s=_si(table, "cpu_attention_gb_per_s", where),
        cpu_attention_overlapped_bytes_per_s=_si(table, "cpu_attention_overlapped_gb_per_s", where),
        cpu_attention_overlapped_micro_batches=om, cpu_attention_overlapped_by_micro_batch=ob,
        cpu_attention_loop_shapes=loop_shapes, cpu_attention_loop_call_s=loop_s,
        cpu_dram_bytes_per_s=_si(table, "cpu_dram_gb_per_s", where),
        cpu_dram_copy_bytes_per_s=_si(table, "cpu_dram_copy_gb_per_s", where),
        gpu_hbm_bytes_per_s=_si(table, "gpu_hbm_gb_per_s", where),
        decode_visit_s=_si(table, "decode_visit_us", where),
        decode_visit_s_by_schedule=_by_schedule(table.get("decode_visit_us_by_schedule", {}),
                                                "decode_visit_us_by_schedule", where),
        decode_visit_s_grouped_by_schedule=_by_schedule(table.get("decode_visit_us_grouped_by_schedule", {}),
                                                        "decode_visit_us_grouped_by_schedule", where),
        grouped_above_tokens=int(_positive(table["grouped_above_tokens"], "grouped_above_tokens", where))
        if "grouped_above_tokens" in table else 0,
        cpu_attention_call_s=_si(table, "cpu_attention_call_us", where),
        cpu_attention_time_of_compute_by_kv_format=_by_name(
            table.get("cpu_attention_time_of_compute_by_kv_format", {}), "cpu_attention_time_of_compute_by_kv_format",
            where, SCALED_KV_FORMATS, "KV format", "int8 = 0.6"),
        cpu_attention_loop_time_of_compute_by_kv_format=_by_name(
            table.get("cpu_attention_loop_time_of_compute_by_kv_format", {}),
            "cpu_attention_loop_time_of_compute_by_kv_format", where, SCALED_KV_FORMATS, "KV format", "int8 = 0.9"),
        method=str(_req(table, "method", where)), date=str(_req(table, "date", where)),
    )


def _measured_sections(data: Mapping, where: str) -> Measured | None:
    """[measured] (the machine) and [calibration] (the runtime on it) as one Measured; None without either.
    [calibration] needs [measured], which holds the method and date of both."""
    if "calibration" in data and "measured" not in data:
        raise HardwareError(f"{where}: [calibration] needs a [measured] section (its method and date)")
    if "measured" not in data:
        return None
    for section in ("measured", "calibration"):
        if not isinstance(data.get(section, {}), Mapping):
            raise HardwareError(f"{where}: [{section}] must be a table")
    label = f"{where} [measured]" + (" [calibration]" if "calibration" in data else "")
    return _measured({**data["measured"], **data.get("calibration", {})}, label)


def _attention_loop(table: Mapping, where: str):
    """cpu_attention_loop_shapes [[sequences, slots per sequence, bytes per slot], ...] and, per shape,
    cpu_attention_loop_call_ms; at least three, to fit three costs."""
    shapes, ms = table.get("cpu_attention_loop_shapes", []), table.get("cpu_attention_loop_call_ms", [])
    if not isinstance(shapes, list) or not isinstance(ms, list) or len(shapes) != len(ms):
        raise HardwareError(f"{where}: 'cpu_attention_loop_shapes' and 'cpu_attention_loop_call_ms' must be lists "
                            f"of one entry per measured setting")
    if shapes and len(shapes) < 3:
        raise HardwareError(f"{where}: 'cpu_attention_loop_shapes' needs at least 3 settings, got {len(shapes)}")
    out = []
    for shape in shapes:
        if not isinstance(shape, list) or len(shape) != 3:
            raise HardwareError(f"{where}: 'cpu_attention_loop_shapes' entries are [sequences, slots per sequence, "
                                f"bytes per slot], got {shape!r}")
        out.append(tuple(_positive(v, "cpu_attention_loop_shapes", where) for v in shape))
    unit = unit_of("cpu_attention_loop_call_ms")
    return tuple(out), tuple(_positive(v, "cpu_attention_loop_call_ms", where) * unit for v in ms)


def _curves_by_shape(table: Mapping, shapes_key: str, x_key: str, y_key: str, fields: tuple[str, ...], where: str):
    """`shapes_key` [[field, ...], ...] with, per shape, a curve of `y_key` (TFLOP/s) over `x_key`
    (ascending after reading): the MoE layer by expert shape, the prefill layer's rest by attention shape."""
    shapes, xs, ys = table.get(shapes_key, []), table.get(x_key, []), table.get(y_key, [])
    if not isinstance(shapes, list) or not (len(shapes) == len(xs) == len(ys)):
        raise HardwareError(f"{where}: '{shapes_key}', '{x_key}' and '{y_key}' must be lists of one entry per shape")
    out_shapes, out_x, out_y = [], [], []
    for shape, x, y in zip(shapes, xs, ys):
        if not isinstance(shape, list) or len(shape) != len(fields):
            raise HardwareError(f"{where}: '{shapes_key}' entries are [{', '.join(fields)}], got {shape!r}")
        if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y) or not x:
            raise HardwareError(f"{where}: the curve of shape {shape} needs as many '{x_key}' as '{y_key}' values")
        order = np.argsort(x)
        out_shapes.append(tuple(int(_positive(v, shapes_key, where)) for v in shape))
        out_x.append(tuple(_positive(x[i], x_key, where) for i in order))
        out_y.append(tuple(_positive(y[i], y_key, where) * unit_of(y_key) for i in order))
    return tuple(out_shapes), tuple(out_x), tuple(out_y)


def _memory(table, where: str) -> MemoryProfile:
    if not isinstance(table, Mapping):
        raise HardwareError(f"{where}: must be a table")
    kw = {}
    for key, field_name in MEMORY_KEYS.items():
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise HardwareError(f"{where}: '{key}' must be a non-negative number, got {value!r}")
            kw[field_name] = float(value) * unit_of(key)
    return MemoryProfile(**kw, measured=True, source=str(_req(table, "source", where)))


def parse_profile(data: Mapping, name: str, path: str = "") -> HardwareProfile:
    where = path or name
    odd = misplaced_or_unknown_key(data)
    if odd:
        raise HardwareError(f"{where}: {odd}")
    for section in ("gpu", "cpu", "link"):
        if section not in data:
            raise HardwareError(f"{where}: missing section [{section}]")
        if not isinstance(data[section], Mapping):
            raise HardwareError(f"{where}: [{section}] must be a table")
    lk = data["link"]
    lw = f"{where} [link]"
    def rate(key, default=None):
        value = _req(lk, key, lw) if default is None else lk.get(key, default / unit_of(key))
        return _positive(value, key, lw) * unit_of(key)

    h2d, d2h = rate("h2d_gb_per_s"), rate("d2h_gb_per_s")
    link = Link(h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h, duplex_bytes_per_s=rate("duplex_gb_per_s", h2d + d2h),
                pageable_h2d_bytes_per_s=rate("pageable_h2d_gb_per_s", h2d),
                source=str(_req(lk, "source", lw)), gpus_per_link=_gpus_per_link(lk, data["gpu"], lw),
                peer_bytes_per_s=rate("peer_gb_per_s") if "peer_gb_per_s" in lk else 0.0)
    return HardwareProfile(
        name=str(data.get("name", name)), description=str(data.get("description", "")),
        gpu=_unit(data["gpu"], f"{where} [gpu]"), cpu=_unit(data["cpu"], f"{where} [cpu]"), link=link,
        measured=_measured_sections(data, where),
        path=path, memory=_memory(data["memory"], f"{where} [memory]") if "memory" in data else MemoryProfile(),
    )


def profile_dirs() -> list[Path]:
    extra = os.environ.get("MOE_LIGHTNING_PROFILES")
    return ([Path(p) for p in extra.split(os.pathsep) if p] if extra else []) + [PROFILE_DIR]


def available_profiles() -> list[str]:
    names = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_profile(name_or_path: str | os.PathLike) -> HardwareProfile:
    """Load a profile by built-in name (`t4-s1`) or by path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix != ".toml" or (not p.is_file() and p.parent == Path(".")):
        name_or_path = p.stem if p.suffix == ".toml" else name_or_path
        for d in profile_dirs():
            if (d / f"{name_or_path}.toml").is_file():
                p = d / f"{name_or_path}.toml"
                break
        else:
            raise HardwareError(f"unknown hardware profile {str(name_or_path)!r}; "
                                f"built-in: {', '.join(available_profiles())}")
    if not p.is_file():
        raise HardwareError(f"hardware profile file not found: {p}")
    try:
        data = tomllib.loads(read_text(p, "hardware profile", HardwareError))
    except tomllib.TOMLDecodeError as e:
        raise HardwareError(f"{p}: not valid TOML ({e})") from None
    except RecursionError:
        raise HardwareError(f"{p}: TOML nested too deeply") from None
    return parse_profile(data, p.stem, str(p))
