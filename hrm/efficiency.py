"""The efficiency model: what a machine without a measured profile attains, as fractions of the unit-level
rates its profile states ([gpu], [cpu], [link]), each fraction with its source.

The cost model reads a profile's measured curves and calibrations where it has them (hrm.rates). A profile
with none (datasheet and assumed figures), or one whose measurements are set aside (`--datasheet`), is
priced here instead: `attained` makes the `Measured` those figures imply. A profile with published
measurements of its machine (l4-s2: the paper's single-layer times) keeps them and takes the rest from here.

Where the fractions come from (FRACTIONS lists each with its source):
- the MoE-Lightning paper's single-layer micro-benchmarks of its L4 host (FACTS.md, Fig. 9): CPU decode
  attention by DRAM bandwidth and cores, and the MoE FFN's share of the GPU memory bandwidth;
- published PCIe rates by generation (FACTS.md's GPU table): the pinned rate of large copies;
- unit-level micro-benchmarks of the H200 machine that are not the whole-model runs predicted with this
  model (benchmarks/leave_one_out.py): the GEMM rate by tokens and of the datasheet peak (FACTS.md,
  2026-11-28), copies by size and within host memory (FACTS.md), the runtime's MoE layer by expert width
  (call 5's moe_kernels.json), and the runtime's fixed host work per layer visit and per prompt token (the
  decode-loop and prefill probes of `moe-lightning profile`, 2026-12-02): the only machine whose runtime
  overheads were measured; they are taken as they are, not scaled to other hosts.

A unit whose `source` begins "measured" (what `moe-lightning profile` writes) or "FACTS.md measurement"
states rates attained on that machine (large GEMM, device copy, 1 GiB pinned copies): those are not
derated again. Any other unit is read as datasheet figures.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np

from .hardware import HardwareProfile, Measured
from .units import MiB

METHOD = "efficiency model (hrm/efficiency.py)"
MEASURED_SOURCES = ("measured", "FACTS.md measurement")


@dataclass(frozen=True)
class Fraction:
    value: object
    origin: str       # "l4-paper", "published", "h200-unit" (micro-benchmarks), "h200-runtime" (probes)
    source: str


_H200_RUNTIME = ("h200-measured.toml [calibration], `moe-lightning profile` 2026-12-02 (runtime.Engine decode "
                 "loop of mixtral-8x7b[4L], 16-wide experts, mu 1 and 65; prefill slope over 2-6 layers)")

FRACTIONS: dict[str, Fraction] = {
    "gemm_tokens": Fraction((16, 64, 256, 1024, 4096), "h200-unit",
                            "FACTS.md H200 2026-11-28: bf16 [tokens x 4096] x [4096 x 14336]"),
    "gemm_of_peak": Fraction(tuple(np.round(np.array((32, 119, 404, 634, 713)) / 748, 4)), "h200-unit",
                             "FACTS.md H200 2026-11-28: 32, 119, 404, 634, 713 TFLOP/s at those tokens, of the "
                             "8192^3 GEMM's 748"),
    "gemm_peak_of_datasheet": Fraction(round(748 / 989, 4), "h200-unit",
                                       "FACTS.md H200 2026-11-28: 8192^3 bf16 GEMM 748 TFLOP/s against the "
                                       "datasheet's 989 dense"),
    "hbm_of_datasheet": Fraction(round(231 / 300, 4), "l4-paper",
                                 "MoE-Lightning Fig. 9 (FACTS.md): the L4's MoE FFN reads its layer's 2.82 GB "
                                 "of experts in 12.2 ms, 231 GB/s of the datasheet's 300 (the H200's device "
                                 "copy: 4.1 of 4.8 TB/s)"),
    "moe_layer_widths": Fraction((768, 1024, 14336), "h200-unit",
                                 "benchmarks/results/whole_model/h200-2026-12-02-call5/moe_kernels.json: the "
                                 "runtime's MoE layer, every expert resident, 4,096-token chunk, at the expert "
                                 "widths of qwen3-30b-a3b, olmoe-1b-7b, mixtral-8x7b"),
    "moe_layer_of_peak": Fraction((round(197 / 737.8, 4), round(247 / 737.8, 4), round(488 / 737.8, 4)),
                                  "h200-unit",
                                  "the same file: routed FLOP/s 197, 247 and 488 TFLOP/s of that machine's "
                                  "737.8 bf16 GEMM rate (the rest of a layer's time is its element-wise "
                                  "kernels, which weigh more as experts narrow)"),
    "link_latency_s": Fraction(21e-6, "h200-unit",
                               "FACTS.md H200 2026-11-28: pinned H2D 43 GB/s at 4 MiB and 55 at 1 GiB, a fixed "
                               "21 us per copy"),
    "pcie_pinned_of_raw": Fraction({3: round(12.5 / 15.75, 3), 4: round(25 / 31.5, 3), 5: round(55 / 63, 3)},
                                   "published",
                                   "FACTS.md GPU table: pinned copies of T4 on PCIe 3.0 x16 12-13 GB/s, A100 and "
                                   "RTX 4090 on PCIe 4.0 ~25, H100/H200 on PCIe 5.0 50-56, of 15.75 / 31.5 / 63 "
                                   "GB/s raw per direction"),
    "cpu_attention_of_dram": Fraction(0.467, "l4-paper",
                                      "MoE-Lightning Fig. 9 (FACTS.md), the 20 (mu, ctx) CPU attention calls fitted "
                                      "(hrm.rates._fit_attention_loop): KV read at 46.7 GB/s of the host's 100"),
    "cpu_attention_per_core_bytes_per_s": Fraction(46.7e9 / 24, "l4-paper",
                                                   "the same fit over the L4 host's 24 cores (2.2 GHz Xeon)"),
    "cpu_attention_per_seq_core_s": Fraction(1.468e-6 * 24, "l4-paper",
                                             "the same fit: 1.47 us per sequence per call on 24 cores"),
    "dram_copy_of_read": Fraction(round(35 / 88, 3), "h200-unit",
                                  "FACTS.md H200 2026-11-28: host memcpy 70 GB/s read + write (35 copied) "
                                  "against 88 read"),
    "decode_visit_s_by_schedule": Fraction((("cgopipe", 1433e-6), ("s3", 2019e-6), ("s4", 2242e-6),
                                            ("blocking", 1985e-6)), "h200-runtime", _H200_RUNTIME),
    "decode_visit_s_grouped_by_schedule": Fraction((("cgopipe", 2372e-6), ("s3", 3907e-6), ("s4", 8651e-6),
                                                    ("blocking", 4082e-6)), "h200-runtime", _H200_RUNTIME),
    "grouped_above_tokens": Fraction(64, "h200-runtime", _H200_RUNTIME),
    "prefill_pass_s_per_token": Fraction(569.1e-9, "h200-runtime", _H200_RUNTIME),
}
"""Every fraction the model uses, by name."""

NEUTRAL = {"gemm_of_peak": (1.0,) * 5, "gemm_peak_of_datasheet": 1.0, "hbm_of_datasheet": 1.0,
           "moe_layer_of_peak": (1.0,) * 3, "link_latency_s": 0.0, "cpu_attention_of_dram": 1.0,
           "cpu_attention_per_core_bytes_per_s": float("inf"), "cpu_attention_per_seq_core_s": 0.0,
           "dram_copy_of_read": 0.5, "decode_visit_s_by_schedule": (), "decode_visit_s_grouped_by_schedule": (),
           "grouped_above_tokens": 0, "prefill_pass_s_per_token": 0.0}
"""What each fraction is where the model leaves it out (the unit-level roofline): for `without`."""

_active: dict[str, object] = {k: f.value for k, f in FRACTIONS.items()}
_cache: dict[int, tuple] = {}


@contextmanager
def without(*origins: str):
    """Price with the fractions of these origins left out (NEUTRAL): how much each source carries
    (benchmarks/leave_one_out.py)."""
    global _active
    saved = _active
    _active = {k: (NEUTRAL[k] if FRACTIONS[k].origin in origins and k in NEUTRAL else f.value)
               for k, f in FRACTIONS.items()}
    _cache.clear()
    try:
        yield
    finally:
        _active = saved
        _cache.clear()


def value(name: str):
    return _active[name]


def peaks_measured(unit_source: str) -> bool:
    """Whether a unit's rates were attained on its machine (not derated again), by its source."""
    return unit_source.startswith(MEASURED_SOURCES)


def pcie_pinned_bytes_per_s(generation: int, lanes: int = 16) -> float:
    """Pinned copies of large buffers over PCIe of this generation and width: raw rate x published fraction."""
    raw = {3: 0.985e9, 4: 1.969e9, 5: 3.938e9}[generation] * lanes      # per lane, per direction (128b/130b)
    return raw * FRACTIONS["pcie_pinned_of_raw"].value[generation]


def large_gemm_flops_per_s(hw: HardwareProfile, dtype: str = "bf16") -> float:
    """What one GPU's large GEMMs attain: the unit's peak, derated from a datasheet figure."""
    derate = 1.0 if peaks_measured(hw.gpu.source) else value("gemm_peak_of_datasheet")
    return hw.gpu.flops_per_s(dtype) * derate


def cpu_attention_model(hw: HardwareProfile) -> tuple[float, float, float]:
    """(fixed s per call, s per sequence, s per KV byte) of CPU decode attention on this host: the L4
    host's, read at the host's DRAM bandwidth or its cores, whichever bounds."""
    cores = max(1, hw.cpu.cores or 1)
    rate = min(value("cpu_attention_of_dram") * hw.cpu.mem_bytes_per_s,
               value("cpu_attention_per_core_bytes_per_s") * cores)
    return 0.0, value("cpu_attention_per_seq_core_s") / cores, 1.0 / rate


def modelled(hw: HardwareProfile) -> Measured:
    """The rates the efficiency model gives `hw` from its unit-level figures alone."""
    key = id(hw)
    if key in _cache and _cache[key][0] is hw:
        return _cache[key][1]
    measured_gpu = peaks_measured(hw.gpu.source)
    peak = large_gemm_flops_per_s(hw)
    hbm = hw.gpu.mem_bytes_per_s * (1.0 if measured_gpu else value("hbm_of_datasheet"))
    b, t0 = hw.link.h2d_bytes_per_s, value("link_latency_s")
    sizes = np.array([0.25, 1, 4, 16, 64, 256, 1024]) * MiB
    fixed, per_seq, per_byte = cpu_attention_model(hw)
    shapes = ((32, 512.0, 4096.0), (256, 512.0, 4096.0), (1024, 256.0, 4096.0))
    calls = tuple(fixed + n * per_seq + n * ctx * nb * per_byte for n, ctx, nb in shapes)
    dram = hw.cpu.mem_bytes_per_s
    by_schedule = value("decode_visit_s_by_schedule")
    m = Measured(
        gpu_gemm_tokens=tuple(float(t) for t in FRACTIONS["gemm_tokens"].value),
        gpu_gemm_flops_per_s=tuple(float(f) * peak for f in value("gemm_of_peak")),
        h2d_sizes_bytes=tuple(float(s) for s in sizes), h2d_bytes_per_s=tuple(float(b * s / (s + b * t0)) for s in sizes),
        cpu_attention_bytes_per_s=1.0 / per_byte, cpu_attention_loop_shapes=shapes, cpu_attention_loop_call_s=calls,
        cpu_dram_bytes_per_s=dram, cpu_dram_copy_bytes_per_s=value("dram_copy_of_read") * dram, gpu_hbm_bytes_per_s=hbm,
        decode_visit_s=dict(by_schedule).get("cgopipe", 0.0), decode_visit_s_by_schedule=by_schedule,
        decode_visit_s_grouped_by_schedule=value("decode_visit_s_grouped_by_schedule"),
        grouped_above_tokens=int(value("grouped_above_tokens")),
        prefill_pass_s_per_token=value("prefill_pass_s_per_token"),
        method=METHOD, date="2026-12-03")
    if len(_cache) > 32:
        _cache.clear()
    _cache[key] = (hw, m)
    return m


def _merged(published: Measured, model: Measured) -> Measured:
    """Published measurements where they were made, the model's rates elsewhere (paired curves together)."""
    pairs = {"gpu_gemm_tokens": "gpu_gemm_flops_per_s", "h2d_sizes_bytes": "h2d_bytes_per_s",
             "cpu_attention_loop_shapes": "cpu_attention_loop_call_s"}
    out = {}
    for f in fields(Measured):
        if f.name in ("method", "date") or f.name in pairs.values():
            continue
        own = getattr(published, f.name)
        src = published if own else model
        out[f.name] = getattr(src, f.name)
        if f.name in pairs:
            out[pairs[f.name]] = getattr(src, pairs[f.name])
    return replace(model, **out, method=f"{published.method}; {METHOD} elsewhere", date=published.date)


def attained(hw: HardwareProfile, use_measured: bool = True) -> Measured | None:
    """The measured rates the cost model reads for `hw`: its own where measured on that machine, the
    published ones with the efficiency model filling the rest, else the efficiency model's."""
    m = hw.measured
    if use_measured and m is not None and not m.method.startswith("published"):
        return m
    model = modelled(hw)
    if use_measured and m is not None:
        return _merged(m, model)
    return model


def is_modelled(m: Measured | None) -> bool:
    return m is not None and METHOD in m.method


def moe_layer_flops_per_s(hw: HardwareProfile, spec, m: Measured | None):
    """The runtime's MoE layer at a whole prefill chunk, routed FLOP/s of one GPU, where the efficiency
    model prices it (by the model's expert width, interpolated in log width); None elsewhere."""
    if not is_modelled(m):
        return None
    widths = FRACTIONS["moe_layer_widths"].value
    frac = np.interp(np.log(spec.moe_intermediate_size), np.log(widths), value("moe_layer_of_peak"))
    return float(frac) * large_gemm_flops_per_s(hw, spec.dtypes.name)


def sources() -> list[dict]:
    """Every fraction with its value, origin and source (for reports and the README)."""
    return [{"name": k, "value": f.value, "origin": f.origin, "source": f.source} for k, f in FRACTIONS.items()]
