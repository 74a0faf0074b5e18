"""What each resource of a machine attains for a setting (model, machine, workload, placement): the
measured curves of the profile where it has them (the runtime's own kernels and transfers), else the
datasheet roofline; and the seconds a cost takes on the GPU or the CPU at those rates."""
from __future__ import annotations

from dataclasses import dataclass
from collections import Counter
from functools import lru_cache
from itertools import combinations

import numpy as np

from .cost import Cost
from .efficiency import attained
from .formats import expert_format, kv_format
from .hardware import HardwareProfile, interp_log
from .policy import Placement, Policy, ReadsPlacement
from .schedules import SCHEDULES
from .spec import ModelSpec, Workload


@dataclass(frozen=True)
class Setting(ReadsPlacement):
    """What stays fixed while a solver varies N, mu, r_w and r_c."""
    spec: ModelSpec
    hardware: HardwareProfile
    workload: Workload
    placement: Placement = Placement()
    pin_all_weights: bool = True    # offloaded weights live in pinned memory (no DRAM->pinned staging step)
    use_measured: bool = True       # use the profile's measured curves (else its units and the efficiency model)
    efficiency_model: bool = True   # price what the profile did not measure by hrm/efficiency.py (else the roofline)

    @classmethod
    def of(cls, spec, hardware, workload, policy: Policy, **kw) -> "Setting":
        return cls(spec, hardware, workload, policy.placement, **kw)


def _measured(s: Setting):
    """The measured rates the cost model reads: the profile's own where measured on its machine, else (or
    with use_measured off) the efficiency model's from its units, published measurements kept
    (hrm.efficiency.attained); without the efficiency model, the profile's measurements or none."""
    if not s.efficiency_model:
        return s.hardware.measured if s.use_measured else None
    return attained(s.hardware, s.use_measured)



def gpu_gemm_flops_per_s(s: Setting, tokens_per_gemm):
    """Attainable GEMM FLOP/s of the GPU(s) at a given number of tokens per weight matrix."""
    gpu = s.hardware.gpu
    peak = gpu.flops_per_s(s.spec.dtypes.name)
    m = _measured(s)
    if m is not None and m.gpu_gemm_tokens:
        rate = interp_log(tokens_per_gemm, m.gpu_gemm_tokens, m.gpu_gemm_flops_per_s)
        return np.minimum(rate, peak) * gpu.count
    return peak * gpu.count



def gpu_hbm_bytes_per_s(s: Setting) -> float:
    m = _measured(s)
    bw = m.gpu_hbm_bytes_per_s if m is not None and m.gpu_hbm_bytes_per_s else s.hardware.gpu.mem_bytes_per_s
    return bw * s.hardware.gpu.count



def expert_dequant_s(s: Setting) -> float:
    """One dequantization of a layer's routed experts into the compute dtype on the GPU, where they are
    stored quantized (runtime.quant.DequantTable: once per layer in prefill and in each decode step, the
    micro-batches of a visit reusing it): its memory traffic at the HBM rate. 0 for experts stored as the
    other weights."""
    name = s.spec.dtypes.expert_format
    if not name or not s.ffn_on_gpu:
        return 0.0
    weights = s.spec.routed_expert_params_per_moe_layer
    return weights * expert_format(name).dequant_traffic_bytes_per_weight / gpu_hbm_bytes_per_s(s)


def cpu_attention_bytes_per_s(s: Setting, num_micro_batches=2, mu=None):
    """KV bytes/s of CPU decode attention. In CGOPipe with two or more micro-batches the attention overlaps
    the main thread's launching of GPU work on the same host, so the rate measured inside that loop
    applies, read at micro-batch size `mu` where the profile has it by size; with one micro-batch (nothing
    to overlap) and in S3 the host waits: the isolated rate."""
    m = _measured(s)
    isolated = m.cpu_attention_bytes_per_s if m is not None and m.cpu_attention_bytes_per_s else cpu_dram_bytes_per_s(s)
    if m is not None and SCHEDULES[s.schedule].overlapped_attention and m.cpu_attention_overlapped_bytes_per_s:
        overlapped = m.cpu_attention_overlapped_bytes_per_s
        if mu is not None and m.cpu_attention_overlapped_micro_batches:
            overlapped = interp_log(mu, m.cpu_attention_overlapped_micro_batches, m.cpu_attention_overlapped_by_micro_batch)
        return np.where(np.asarray(num_micro_batches) > 1, overlapped, isolated)
    return isolated



@lru_cache(maxsize=64)
def _fit_attention_loop(shapes: tuple, call_s: tuple) -> tuple[float, float, float]:
    """(fixed s, s per sequence, s per KV byte) >= 0 whose sum over each measured call matches its time
    best in relative terms (least squares over the non-negative subsets: three unknowns)."""
    a = np.array([[1.0, n, n * slots * b] for n, slots, b in shapes])      # [settings, 3]
    y = np.asarray(call_s, float)
    scale = np.abs(a).max(axis=0)
    rows = a / scale / y[:, None]                                          # relative residuals
    best, best_err = np.zeros(3), np.inf
    for k in (3, 2, 1):
        for cols in combinations(range(3), k):
            x, *_ = np.linalg.lstsq(rows[:, cols], np.ones(len(y)), rcond=None)
            if np.any(x < 0):
                continue
            err = float(np.sum((rows[:, cols] @ x - 1.0) ** 2))
            if err < best_err:
                best_err, best = err, np.zeros(3)
                best[list(cols)] = x
    return tuple(float(v) for v in best / scale)


def cpu_attention_loop_model(s: Setting):
    """(fixed s, s per sequence, s per KV byte) of one call of the runtime's CPU decode attention inside
    its decode loop, fitted to the profile's in-loop measurements at several (sequences, context); None
    where the profile has fewer than three. A call's time is not its bytes over one rate: per sequence it
    pays a fixed part besides its KV reads (H200: 1,024 sequences read 40 GB/s at context 512, 27 at 256).
    Where the profile measured calls at several KV shapes (bytes per slot), the fit is to the calls of the
    shape nearest the model's that has at least three."""
    m = _measured(s)
    if m is None or len(m.cpu_attention_loop_shapes) < 3:
        return None
    shapes, calls = m.cpu_attention_loop_shapes, m.cpu_attention_loop_call_s
    per_slot = s.spec.kv_elems_per_token_layer * s.spec.dtypes.kv_bytes
    held = [b for b, n in Counter(shape[2] for shape in shapes).items() if n >= 3]
    if len(held) > 1:
        near = min(held, key=lambda b: abs(np.log(b / per_slot)))
        rows = [i for i, shape in enumerate(shapes) if shape[2] == near]
        shapes, calls = tuple(shapes[i] for i in rows), tuple(calls[i] for i in rows)
    return _fit_attention_loop(tuple(map(tuple, shapes)), tuple(calls))


def cpu_attention_calls_s(s: Setting, seqs, ctx, calls=1):
    """Seconds of `calls` CPU attention calls over `seqs` sequences in all at context `ctx` (slots read per
    sequence), by cpu_attention_loop_model; None without one."""
    fit = cpu_attention_loop_model(s)
    if fit is None:
        return None
    fixed, per_seq, per_byte = fit
    kv_bytes = np.asarray(seqs) * ctx * s.spec.kv_elems_per_token_layer * s.spec.dtypes.kv_bytes
    return calls * fixed + np.asarray(seqs) * per_seq + kv_bytes * per_byte


def cpu_dram_bytes_per_s(s: Setting) -> float:
    m = _measured(s)
    return m.cpu_dram_bytes_per_s if m is not None and m.cpu_dram_bytes_per_s else s.hardware.cpu.mem_bytes_per_s


def cpu_dram_copy_bytes_per_s(s: Setting) -> float:
    """Bytes a host memcpy moves per second: measured, else half the DRAM bandwidth (it reads and writes each)."""
    m = _measured(s)
    return m.cpu_dram_copy_bytes_per_s if m is not None and m.cpu_dram_copy_bytes_per_s else cpu_dram_bytes_per_s(s) / 2


def weight_staging_s(s: Setting, weight_bytes):
    """Host time to copy streamed weights from pageable DRAM into pinned staging buffers before the DMA, where
    the offloaded weights are not all pinned (Setting.pin_all_weights off); 0 where they are."""
    return 0.0 if s.pin_all_weights else weight_bytes / cpu_dram_copy_bytes_per_s(s)



def h2d_bytes_per_s(s: Setting, transfer_bytes) -> float:
    """Host-to-device rate of the whole host: one link's at this transfer size, times its links."""
    lk, n = s.hardware.link, s.hardware.num_links
    m = _measured(s)
    if m is not None and m.h2d_sizes_bytes:
        rate = interp_log(transfer_bytes, m.h2d_sizes_bytes, m.h2d_bytes_per_s)
        return np.minimum(rate, lk.h2d_bytes_per_s) * n
    return lk.h2d_bytes_per_s * n



def d2h_bytes_per_s(s: Setting) -> float:
    return s.hardware.link.d2h_bytes_per_s * s.hardware.num_links



def duplex_bytes_per_s(s: Setting) -> float:
    return s.hardware.link.duplex_bytes_per_s * s.hardware.num_links



def decode_visit_s(s: Setting, mu, num_micro_batches=2):
    """The runtime's fixed cost of one micro-batch of `mu` visiting one layer under the setting's schedule
    (measured; 0 without a measurement). Micro-batches above the profile's `grouped_above_tokens` take the
    runtime's grouped MoE path, which launches more kernels, and cost what was measured for it; the rest
    cost the per-schedule figure, or the schedule-independent one where the profile has none. CGOPipe with
    CPU attention and one micro-batch has nothing to overlap its host work with, so it runs as S3 does and
    costs S3's visit."""
    m = _measured(s)
    if m is None:
        return 0.0

    def cost(schedule):
        small = dict(m.decode_visit_s_by_schedule).get(schedule, m.decode_visit_s)
        large = dict(m.decode_visit_s_grouped_by_schedule).get(schedule)
        if large is None or not m.grouped_above_tokens:
            return small
        return np.where(np.asarray(mu) > m.grouped_above_tokens, large, small)

    alone = SCHEDULES[s.schedule].one_micro_batch_as
    if alone is not None and not s.attention_on_gpu:
        return np.where(np.asarray(num_micro_batches) > 1, cost(s.schedule), cost(alone))
    return cost(s.schedule)



def cpu_attention_call_s(s: Setting) -> float:
    m = _measured(s)
    return m.cpu_attention_call_s if m is not None else 0.0


def cpu_attention_time_of_compute(s: Setting, fmt: str) -> float:
    """The CPU attention's time per call over a scaled 8-bit KV cache of format `fmt` over its time over the
    compute dtype's: the profile's measurement inside the decode loop where it prices the compute dtype's
    calls by their loop fit (cpu_attention_loop_model) and measured this format there, else its measurement
    of the kernel alone (cpu_attention_time_of_compute_by_kv_format), else the format's default
    (hrm.formats.KVFormat.cpu_attention_time_of_compute). In the loop the ratio is not the kernels': H200
    call 39 ran int8 calls at 0.93-0.95 of bf16's in-loop time, where the kernels alone gave 0.79."""
    m = _measured(s)
    if m is None:
        return kv_format(fmt).cpu_attention_time_of_compute
    loop = dict(m.cpu_attention_loop_time_of_compute_by_kv_format)
    if fmt in loop and cpu_attention_loop_model(s) is not None:
        return loop[fmt]
    return dict(m.cpu_attention_time_of_compute_by_kv_format).get(fmt, kv_format(fmt).cpu_attention_time_of_compute)



def roofline_s(cost: Cost, flops_per_s, bytes_per_s):
    """Roofline seconds of a cost: max(FLOPs / FLOP/s, bytes / bandwidth)."""
    return np.maximum(cost.flops / flops_per_s, cost.bytes / bytes_per_s)



def gpu_time(s: Setting, cost: Cost, tokens_per_gemm):
    """Roofline time of work on the GPU at the attainable GEMM rate of its tokens and the HBM bandwidth."""
    return roofline_s(cost, gpu_gemm_flops_per_s(s, tokens_per_gemm), gpu_hbm_bytes_per_s(s))



def cpu_time(s: Setting, cost: Cost, bytes_per_s):
    return roofline_s(cost, s.hardware.cpu.flops_per_s("fp32"), bytes_per_s)



def attention_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """(hidden, q_dim, K+V elements per token and layer): what a prefill layer's rest is measured and
    priced by (the profile's gpu_prefill_rest_shapes)."""
    return spec.hidden_size, spec.q_dim, spec.kv_elems_per_token_layer


def prefill_rest_flops_per_s(s: Setting, tokens):
    """The measured FLOP/s of the runtime's prefill layer without its experts and dense FFN (its time less
    the routed experts' and the dense FFN's roofline, over the FLOPs of hrm.ops.prefill_rest) for a chunk of
    `tokens` tokens
    (interpolated in log tokens, flat beyond the measured range): at the nearest measured attention shape
    within MOE_SHAPE_TOLERANCE where the profile has them by shape, else its one-model curve, else None.
    It holds what the roofline of those parts misses: the chunk's attention layout, KV and hidden-state
    staging, and their launches (H200: Qwen3-30B-A3B's whole layer 3.68 ms per 4,096-token chunk, where
    Mixtral's rest rate prices 3.2)."""
    m = _measured(s)
    if m is None:
        return None
    best = _nearest_shape(m.gpu_prefill_rest_shapes, attention_shape(s.spec))
    if best is not None:
        curve = m.gpu_prefill_rest_tokens_by_shape[best], m.gpu_prefill_rest_flops_per_s_by_shape[best]
    elif m.gpu_prefill_tokens:
        curve = m.gpu_prefill_tokens, m.gpu_prefill_rest_flops_per_s
    else:
        return None
    return interp_log(tokens, *curve) * s.hardware.gpu.count



MOE_SHAPE_TOLERANCE = 1.5
"""A measured MoE curve prices a model whose hidden and expert widths are each within this factor of the
measured shape's (the nearest such shape, in log distance); other models take the GEMM roofline."""



def moe_curve(s: Setting):
    """(tokens per expert, routed FLOP/s) of the profile's MoE curve for this model's expert shape, or
    None where no measured shape is within MOE_SHAPE_TOLERANCE."""
    m = _measured(s)
    if m is None:
        return None
    best = _nearest_shape([shape[:2] for shape in m.gpu_moe_shapes], (s.spec.hidden_size, s.spec.moe_intermediate_size))
    return None if best is None else (m.gpu_moe_tokens_per_expert[best], m.gpu_moe_flops_per_s[best])


def _nearest_shape(shapes, want) -> int | None:
    """Index of the measured shape nearest `want` in summed log distance, each dimension within
    MOE_SHAPE_TOLERANCE; None where there is none."""
    if not len(shapes):
        return None
    dist = [np.abs(np.log(np.asarray(shape, float)) - np.log(np.asarray(want, float))) for shape in shapes]
    best = int(np.argmin([d.sum() for d in dist]))
    return None if dist[best].max() > np.log(MOE_SHAPE_TOLERANCE) else best
