"""The cost model: per-layer stage times, memory peaks and throughput of a policy.

One pass runs N sequences through the model in micro-batches of mu. Decode, per layer and micro-batch
(CGOPipe):  GPU pre-attn -> D2H q/k/v -> CPU attention -> H2D attn out -> GPU O-proj + MoE, while the
next layer's streamed expert pages share the H2D direction with the activations.

Every resource term below is linear in the policy fractions r_w (weights_gpu_frac) and r_c
(kv_gpu_frac) once N, mu and the placement are fixed, so the same functions accept floats, numpy
arrays (the grid search) or pulp expressions (the MILP); PassTerms.compose takes the max of each
layer's terms (np.maximum, or an epigraph variable t >= term). What each resource attains (the rates)
is hrm/rates.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import ops
from .efficiency import moe_layer_flops_per_s
from .hardware import HardwareProfile, interp_log
from .memory import MemoryUse, kv_slots_per_sequence, memory_use
from .parallel import ALLREDUCES_PER_LAYER, can_shard, ring_allreduce_s
from .policy import Policy, prefill_chunk_sequences, realised_kv_frac
from .rates import (Setting, _measured, expert_dequant_s, cpu_attention_bytes_per_s, cpu_attention_call_s, cpu_attention_calls_s,
                    cpu_attention_time_of_compute,
                    cpu_dram_bytes_per_s, cpu_time, d2h_bytes_per_s, decode_visit_s, duplex_bytes_per_s, gpu_time, h2d_bytes_per_s,
                    moe_curve, prefill_rest_flops_per_s, weight_staging_s)
from .schedules import SCHEDULES
from .spec import ModelSpec, Workload

CONTEXT_SAMPLES = 8
"""Decode steps are priced at this many context lengths (midpoints of equal buckets of steps)."""

RESOURCES = ("gpu", "cpu", "h2d", "d2h", "link", "pipeline")
RESOURCE_LABELS = {
    "gpu": "GPU compute", "cpu": "CPU attention/compute", "h2d": "CPU->GPU link (weights, KV, activations)",
    "d2h": "GPU->CPU link", "link": "CPU<->GPU link, both directions", "pipeline": "pipeline latency (too few micro-batches)",
    "serial": "sum of stages (no overlap)",
    "serial_host": "transfers and CPU work in series with the host's launches (blocking)",
    "launch": "runtime overhead per micro-batch (kernel launches, hand-offs)",
    "weights_block": "next layer's weights as one block, activations waiting behind it",
    "host_chain": "launches in series with CPU attention (the host waits for each, S3)",
    "host_block": "next layer's weights as one block, then launches in series with CPU attention (S3)",
}


# ---------------------------------------------------------------------------------------------------
# machine rates (SI; tensor-parallel GPUs add up)


# ---------------------------------------------------------------------------------------------------
# per-layer terms

@dataclass(frozen=True)
class LayerTimes:
    """Seconds one decoder layer keeps each resource busy, for one pass of N sequences.

    Fields are linear in r_w and r_c (floats, numpy arrays or pulp expressions).
    """
    gpu_s: object
    cpu_s: object
    h2d_weights_s: object
    h2d_act_s: object
    h2d_kv_s: object
    d2h_s: object
    link_s: object          # both directions at once, against the duplex rate
    pipeline_s: object      # one micro-batch's round trip GPU -> D2H -> CPU -> H2D (latency, not load)
    num_micro_batches: object
    launch_s: object = 0.0  # the launching thread's fixed cost: micro-batches x one visit's overhead
    pipelined: bool = True  # layers overlap (next layer's weights load during this one); False: blocking

    @property
    def h2d_s(self):
        return self.h2d_weights_s + self.h2d_act_s + self.h2d_kv_s

    def terms(self, schedule: str) -> dict:
        """The quantities whose maximum is the layer's time under `schedule` (hrm.schedules)."""
        return SCHEDULES[schedule].terms(self)

    def prefill_terms(self) -> dict:
        """The resources a prefill layer keeps busy: its time is their max."""
        return {"gpu": self.gpu_s, "cpu": self.cpu_s, "h2d": self.h2d_s, "d2h": self.d2h_s, "link": self.link_s}


def _micro_batches(N, mu):
    """(full micro-batches, size of the last partial one or 0, number of micro-batches)."""
    N, mu = np.asarray(N), np.asarray(mu)
    full = N // mu
    rest = N - full * mu
    return full, rest, full + (rest > 0)


def _per_micro_batch(fn, N, mu):
    """Sum of fn(size) over the micro-batches of N in steps of mu (fn(0) is never charged)."""
    full, rest, _ = _micro_batches(N, mu)
    return full * fn(np.asarray(mu)) + np.where(rest > 0, fn(np.maximum(rest, 1)), 0.0)


def _attn_out_elems(spec: ModelSpec) -> int:
    return spec.num_attention_heads * spec.attn_v_head_dim


def _qkv_elems(spec: ModelSpec) -> int:
    """Per token, what D2H carries to the CPU attention: queries, and the new K and V entries."""
    return spec.q_dim + spec.kv_elems_per_token_layer


def _cpu_attention_s(s: Setting, seqs, ctx, calls, attn_rate):
    """Seconds of `calls` CPU decode-attention calls over `seqs` sequences at context `ctx`: the profile's
    fitted call model where it has one, else the KV bytes at `attn_rate` plus a fixed cost per call. Over a
    scaled 8-bit cache: its format's measured multiple of the time over the same cache in the compute dtype
    (hrm.rates.cpu_attention_time_of_compute), not the time of its bytes."""
    if s.spec.dtypes.kv_format:
        as_compute = replace(s, spec=replace(s.spec, dtypes=replace(s.spec.dtypes, kv_bytes=s.spec.dtypes.act_bytes,
                                                                    kv_format="")))
        factor = cpu_attention_time_of_compute(s, s.spec.dtypes.kv_format)
        return factor * _cpu_attention_s(as_compute, seqs, ctx, calls, attn_rate)
    t = cpu_attention_calls_s(s, seqs, ctx, calls)
    if t is None:
        t = cpu_time(s, ops.attention(s.spec, seqs, 1, ctx), attn_rate) + calls * cpu_attention_call_s(s)
    return t


def decode_layer_times(s: Setting, N, mu, r_w, r_c, ctx) -> LayerTimes:
    """One decode step of one layer at context length `ctx` (tokens already cached per sequence)."""
    spec = s.spec
    ab, E = spec.dtypes.act_bytes, spec.num_experts
    _, _, m = _micro_batches(N, mu)
    kv_layer_bytes = spec.kv_elems_per_token_layer * spec.dtypes.kv_bytes   # per token, one layer

    def gpu_mb(tokens):
        t = gpu_time(s, ops.layer_gpu_ops(spec, tokens), tokens) + allreduce_s(s, tokens)
        if s.attention_on_gpu:
            t = t + gpu_time(s, ops.attention(spec, tokens, 1, ctx), tokens)
        return t

    def experts_gpu_mb(tokens):
        return routed_experts_time(s, tokens)

    frac_moe = spec.num_moe_layers / spec.num_hidden_layers
    dequant = frac_moe * expert_dequant_s(s)          # quantized experts: once per layer-step (runtime.moe)
    gpu_fixed = _per_micro_batch(gpu_mb, N, mu)
    experts_gpu = _per_micro_batch(experts_gpu_mb, N, mu)
    gpu = gpu_fixed + (experts_gpu if s.ffn_on_gpu else r_w * experts_gpu) + dequant

    # one micro-batch's size (N when a single one holds them all)
    mu_arr = np.minimum(np.asarray(mu), np.asarray(N))
    attn_rate = cpu_attention_bytes_per_s(s, m, mu_arr)
    cpu = 0.0
    h2d_act_bytes = 0.0
    d2h_bytes = 0.0
    if not s.attention_on_gpu:
        cpu = _cpu_attention_s(s, N, ctx, m, attn_rate)
        h2d_act_bytes = N * _attn_out_elems(spec) * ab
        d2h_bytes = N * _qkv_elems(spec) * ab
    if not s.ffn_on_gpu:
        cpu_ffn = cpu_time(s, ops.routed_experts(spec, N), cpu_dram_bytes_per_s(s))
        cpu = cpu + (1 - r_w) * cpu_ffn
        h2d_act_bytes = h2d_act_bytes + N * spec.hidden_size * ab
        d2h_bytes = d2h_bytes + N * spec.hidden_size * ab

    layer_expert_bytes = E * spec.expert_bytes * frac_moe
    page_bytes = layer_expert_bytes / m     # nominal page: the streamed part split per micro-batch
    streamed = (1 - r_w) * layer_expert_bytes if s.ffn_on_gpu else 0.0    # expert bytes over the link
    h2d_weights = streamed / h2d_bytes_per_s(s, page_bytes)
    cpu = cpu + weight_staging_s(s, streamed)                             # the host's copy into pinned staging
    h2d_act = h2d_act_bytes / h2d_bytes_per_s(s, h2d_act_bytes / m)
    h2d_kv = 0.0
    if s.attention_on_gpu:
        # the runtime moves each micro-batch's whole cache (every slot its sequences hold, generated tokens
        # included), not only the ctx slots filled so far
        kv_stream = N * kv_slots_per_sequence(s.workload) * kv_layer_bytes
        h2d_kv = (1 - r_c) * kv_stream / h2d_bytes_per_s(s, kv_stream / m)
        d2h_bytes = d2h_bytes + (1 - r_c) * N * kv_layer_bytes   # the new entries go back to the CPU cache
    d2h = d2h_bytes / d2h_bytes_per_s(s)
    link_bytes = streamed + h2d_act_bytes + d2h_bytes
    if s.attention_on_gpu:
        link_bytes = link_bytes + (1 - r_c) * kv_stream
    link = link_bytes / duplex_bytes_per_s(s)

    # one micro-batch's round trip through the loop (does not depend on r_w)
    # the host launches while the GPU executes: the slower of the two, then the chain through the CPU
    loop = np.maximum(gpu_mb(mu_arr) + experts_gpu_mb(mu_arr) + dequant / m, decode_visit_s(s, mu_arr, m))
    if not s.attention_on_gpu:
        loop = loop + (_cpu_attention_s(s, mu_arr, ctx, 1, attn_rate)
                       + mu_arr * _qkv_elems(spec) * ab / d2h_bytes_per_s(s)
                       + mu_arr * _attn_out_elems(spec) * ab / h2d_bytes_per_s(s, mu_arr * _attn_out_elems(spec) * ab))
    return LayerTimes(gpu_s=gpu, cpu_s=cpu, h2d_weights_s=h2d_weights, h2d_act_s=h2d_act, h2d_kv_s=h2d_kv,
                      d2h_s=d2h, link_s=link, pipeline_s=loop, num_micro_batches=m,
                      launch_s=m * decode_visit_s(s, mu_arr, m), pipelined=SCHEDULES[s.schedule].pipelined)


def prefill_layer_times(s: Setting, N, mu, r_w, r_c) -> LayerTimes:
    """Prefill of one layer for all N sequences: on the GPU, micro-batch by micro-batch, the layer's
    streamed experts loaded once; hidden states staged in CPU memory between layers; KV sent to the CPU."""
    spec = s.spec
    ab, E, p = spec.dtypes.act_bytes, spec.num_experts, s.workload.prompt_len
    _, _, m = _micro_batches(N, mu)

    def gpu_chunk(seqs):
        tokens = seqs * p
        rest, dense = ops.prefill_rest(spec, seqs, p), ops.dense_ffn(spec, tokens)
        rate = prefill_rest_flops_per_s(s, tokens)
        rest_s = gpu_time(s, rest + dense, tokens) if rate is None else rest.flops / rate + gpu_time(s, dense, tokens)
        return rest_s + routed_experts_time(s, tokens) + allreduce_s(s, tokens)

    chunk = prefill_chunk_sequences(p)

    def gpu_mb(seqs):                # a micro-batch runs in chunks of at most `chunk` sequences
        return _per_micro_batch(gpu_chunk, seqs, np.minimum(seqs, chunk))

    frac_moe = spec.num_moe_layers / spec.num_hidden_layers
    gpu = _per_micro_batch(gpu_mb, N, mu) + frac_moe * expert_dequant_s(s)   # quantized: once per layer
    layer_expert_bytes = E * spec.expert_bytes * frac_moe
    weights_bytes = (1 - r_w) * layer_expert_bytes
    hidden_bytes = N * p * spec.hidden_size * ab
    kv_bytes = (1 - r_c) * N * p * spec.kv_elems_per_token_layer * spec.dtypes.kv_bytes
    h2d = weights_bytes / h2d_bytes_per_s(s, layer_expert_bytes) + hidden_bytes / h2d_bytes_per_s(s, hidden_bytes / m)
    d2h = (kv_bytes + hidden_bytes) / d2h_bytes_per_s(s)
    link = (weights_bytes + 2 * hidden_bytes + kv_bytes) / duplex_bytes_per_s(s)
    return LayerTimes(gpu_s=gpu, cpu_s=weight_staging_s(s, weights_bytes), h2d_weights_s=h2d, h2d_act_s=0.0,
                      h2d_kv_s=0.0, d2h_s=d2h, link_s=link, pipeline_s=0.0, num_micro_batches=m)


def allreduce_s(s: Setting, tokens):
    """One layer's all-reduces of `tokens` tokens' hidden states over the tensor-parallel ranks (a profile of
    several GPUs, a model they can shard: hrm.parallel), at the profile's GPU-to-GPU rate (NVLink or PCIe
    peer to peer, [link] peer_gb_per_s), else its host link's."""
    ranks = s.hardware.gpu.count
    if not can_shard(s.spec, ranks):
        return 0.0 * np.asarray(tokens, float)
    nbytes = np.asarray(tokens, float) * s.spec.hidden_size * s.spec.dtypes.act_bytes
    return ALLREDUCES_PER_LAYER * ring_allreduce_s(nbytes, ranks, s.hardware.link.gpu_to_gpu_bytes_per_s)


def prefill_once_s(s: Setting, N):
    """What prefill pays once, not per layer: the LM head over the last positions, and the runtime's
    per-pass cost (measured per prompt token; 0 without a measurement)."""
    m = _measured(s)
    per_pass = N * s.workload.prompt_len * m.prefill_pass_s_per_token if m is not None else 0.0
    return lm_head_time(s, N) + per_pass


def routed_experts_time(s: Setting, tokens):
    """The routed experts of one layer for `tokens` tokens (a prefill chunk, a decode micro-batch): at the
    measured rate of the runtime's own MoE layer at this model's expert shape where the profile has it (moe_curve, read at the
    model's tokens per expert, interpolated in log and held flat beyond the measured range), else the
    roofline at the GEMM rate of tokens per expert."""
    cost = ops.routed_experts(s.spec, tokens)
    per_expert = ops.tokens_per_expert(s.spec, tokens)
    curve = moe_curve(s)
    if curve is not None:
        return cost.flops / (interp_log(per_expert, *curve) * s.hardware.gpu.count)
    layer = moe_layer_flops_per_s(s.hardware, s.spec, _measured(s))     # the efficiency model's MoE layer
    roofline = gpu_time(s, cost, per_expert)
    return roofline if layer is None else np.maximum(roofline, cost.flops / (layer * s.hardware.gpu.count))


def lm_head_time(s: Setting, N):
    return gpu_time(s, ops.lm_head(s.spec, N), N)


def context_samples(workload: Workload):
    """(context lengths, decode steps each stands for): the cache grows from s to s + n - 1."""
    steps = workload.gen_len - 1
    if steps <= 0:
        return np.zeros(0), np.zeros(0)
    k = min(CONTEXT_SAMPLES, steps)
    edges = np.linspace(0, steps, k + 1)
    mids = (edges[:-1] + edges[1:]) / 2.0
    return workload.prompt_len + mids, np.diff(edges)


def step_time(layer_time, lt: LayerTimes, num_layers: int, lm_head_s):
    """One decode step: the layers pipelined back to back, plus one fill/drain and the LM head (blocking:
    the layers one after the other, plus the LM head).

    With m micro-batches in flight the makespan of L*m round trips through the loop is about
    L*T_layer + (round trip - T_layer/m).
    """
    if not lt.pipelined:       # blocking: each layer starts when the last has finished, nothing to fill
        return num_layers * layer_time + lm_head_s
    return (num_layers - 1.0 / lt.num_micro_batches) * layer_time + lt.pipeline_s + lm_head_s


# ---------------------------------------------------------------------------------------------------
# the time of a pass, composed once (estimate, the grid search and the MILP all compose it here)

def max_of(terms, key=None):
    """Elementwise max of the values of a dict or the items of a list (numpy-broadcast); `key` names the
    max for solvers that need it (PassTerms.compose's layer_max)."""
    values = list(terms.values()) if isinstance(terms, dict) else list(terms)
    out = np.asarray(values[0], dtype=float)
    for v in values[1:]:
        out = np.maximum(out, v)
    return out


@dataclass(frozen=True)
class PassTerms:
    """What a pass's time is made of: per layer, the prefill terms and, at each decode context sample,
    the decode terms (a layer's time is the max of its terms); what prefill pays once; the LM head.
    Values are numbers, numpy arrays or solver expressions (linear in r_w and r_c)."""
    num_layers: int
    prefill: dict                 # term -> seconds per prefill layer
    prefill_once: object          # prefill_once_s
    decode: tuple                 # per context sample: (decode steps it stands for, terms, LayerTimes)
    lm_head: object               # seconds per decode step

    def compose(self, layer_max=max_of):
        """(prefill_s, decode_s). `layer_max(terms, key)` is the layer time of a set of terms: their max,
        or a solver's epigraph variable (key: "prefill" or ("decode", sample index))."""
        L = self.num_layers
        prefill = L * layer_max(self.prefill, "prefill") + self.prefill_once
        decode = 0.0
        for j, (w, terms, lt) in enumerate(self.decode):
            decode = decode + w * step_time(layer_max(terms, ("decode", j)), lt, L, self.lm_head)
        return prefill, decode


def pass_terms(s: Setting, N, mu, r_w, r_c) -> PassTerms:
    terms = []
    for ctx, w in zip(*context_samples(s.workload)):
        lt = decode_layer_times(s, N, mu, r_w, r_c, ctx)
        terms.append((float(w), lt.terms(s.schedule), lt))
    return PassTerms(s.spec.num_hidden_layers, prefill_layer_times(s, N, mu, r_w, r_c).prefill_terms(),
                     prefill_once_s(s, N), tuple(terms), lm_head_time(s, N))


def pass_time(s: Setting, N, mu, r_w, r_c):
    """(prefill_s, decode_s) of passes of N sequences, broadcast over arrays of N, mu, r_w, r_c."""
    return pass_terms(s, N, mu, r_w, r_c).compose()


# ---------------------------------------------------------------------------------------------------
# the estimate of one policy

def _max_terms(terms: dict):
    names = list(terms)
    values = np.stack([np.broadcast_to(np.asarray(terms[k], float), np.shape(terms[names[0]])) for k in names])
    return values.max(axis=0), names, values


@dataclass(frozen=True)
class Estimate:
    model: str
    hardware: str
    policy: Policy
    workload: Workload
    prefill_s: float
    decode_s: float
    decode_layer: dict        # resource (and h2d parts) -> seconds per layer at the mean decode context
    prefill_layer: dict       # resource -> seconds per layer
    layer_time_s: float       # decode, at the mean context
    step_time_s: float        # decode, at the mean context
    bound: str                # the resource that binds decode
    memory: MemoryUse
    realised_weights_gpu_frac: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def generated_tokens(self) -> int:
        return self.policy.batch_size * self.workload.gen_len

    @property
    def throughput_tok_s(self) -> float:
        """End to end: generated tokens / (prefill + decode)."""
        return self.generated_tokens / self.total_s

    @property
    def decode_tok_s(self) -> float:
        steps = self.workload.gen_len - 1
        return self.policy.batch_size * steps / self.decode_s if steps > 0 else float("nan")

    @property
    def bound_label(self) -> str:
        return RESOURCE_LABELS.get(self.bound, self.bound)

    def as_rows(self) -> list[dict]:
        """Long-format rows (phase, item, value, unit) for a pandas breakdown."""
        rows = [{"phase": "decode", "item": f"layer {k}", "value": v, "unit": "s"} for k, v in self.decode_layer.items()]
        rows += [{"phase": "prefill", "item": f"layer {k}", "value": v, "unit": "s"} for k, v in self.prefill_layer.items()]
        rows += [{"phase": "total", "item": k, "value": v, "unit": u} for k, v, u in (
            ("prefill", self.prefill_s, "s"), ("decode", self.decode_s, "s"),
            ("throughput", self.throughput_tok_s, "tok/s"), ("decode throughput", self.decode_tok_s, "tok/s"))]
        rows += [{"phase": f"memory {level}", "item": k, "value": float(v), "unit": "B"}
                 for level, k, v in self.memory.rows()]
        return rows

    def to_dict(self) -> dict:
        return {
            "model": self.model, "hardware": self.hardware, "policy": self.policy.__dict__,
            "workload": self.workload.__dict__, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
            "total_s": self.total_s, "throughput_tok_s": self.throughput_tok_s, "decode_tok_s": self.decode_tok_s,
            "bound": self.bound, "layer_time_s": self.layer_time_s, "step_time_s": self.step_time_s,
            "decode_layer_s": self.decode_layer, "prefill_layer_s": self.prefill_layer,
            "memory_bytes": self.memory.to_dict(),
            "realised_weights_gpu_frac": self.realised_weights_gpu_frac,
        }


def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items()}


def estimate(spec: ModelSpec, hardware: HardwareProfile, workload: Workload, policy: Policy, *,
             pin_all_weights: bool = True, use_measured: bool = True, efficiency_model: bool = True) -> Estimate:
    """Predict prefill and decode time, memory peaks and throughput of one policy (`efficiency_model` off:
    what the profile did not measure at its unit-level roofline, not hrm/efficiency.py's rates)."""
    s = Setting.of(spec, hardware, workload, policy, pin_all_weights=pin_all_weights, use_measured=use_measured,
                   efficiency_model=efficiency_model)
    N, mu = policy.batch_size, policy.micro_batch_size
    r_w = policy.resident_experts(spec.num_experts) / spec.num_experts
    r_c = float(realised_kv_frac(policy.kv_gpu_frac, policy.num_micro_batches))   # as the runtime places it
    L = spec.num_hidden_layers
    head = float(lm_head_time(s, N))
    terms_of_pass = pass_terms(s, N, mu, r_w, r_c)
    prefill_s, decode_s = (float(t) for t in terms_of_pass.compose())
    pre_terms = terms_of_pass.prefill

    mid = decode_layer_times(s, N, mu, r_w, r_c, workload.prompt_len + workload.gen_len / 2.0)
    terms = mid.terms(policy.schedule)
    t_mid, names, values = _max_terms(terms)
    bound = names[int(np.argmax(values))]
    shown = {"gpu": mid.gpu_s, "cpu": mid.cpu_s, "h2d": mid.h2d_s, "h2d_weights": mid.h2d_weights_s,
             "h2d_act": mid.h2d_act_s, "h2d_kv": mid.h2d_kv_s, "d2h": mid.d2h_s, "link": mid.link_s, "pipeline": mid.pipeline_s,
             "launch": mid.launch_s}
    mem = memory_use(s, N, mu, r_w, r_c)
    return Estimate(
        model=spec.name, hardware=hardware.name, policy=policy, workload=workload,
        prefill_s=prefill_s, decode_s=float(decode_s), decode_layer=_floats(shown), prefill_layer=_floats(pre_terms),
        layer_time_s=float(t_mid), step_time_s=float(step_time(t_mid, mid, L, head)), bound=bound,
        memory=mem.floats(),
        realised_weights_gpu_frac=r_w,
    )
