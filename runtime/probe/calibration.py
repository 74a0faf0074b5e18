"""Calibrations of the runtime itself: its MoE layer at several expert shapes, its prefill layer, its
process memory, its decode-visit costs per schedule and its CPU attention inside the decode loop.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from hrm.cost import Cost


from .base import SUSTAIN_S, ProbeError, _fill_random, _median_cuda_s, _sustain
from ..measure import allocator_conf


# Decoder layers of the decode-visit probe's model. At one layer a micro-batch's next visit is the same
# layer's next step, so S4's KV prefetch waits on the host append of the visit just before it, a chain that
# runs with L layers meet only L x micro-batches visits later (H200: S4 4.36 ms per visit at one layer,
# 1.90 ms at four; benchmarks/results/h200/2026-11-29b/visit_profile.json).
VISIT_LAYERS = 4


VISIT_VISITS = 512


# the CPU attention rate inside the CGOPipe loop, at these micro-batch sizes (attention_in_pipeline's arguments)
OVERLAP_SETTINGS = tuple(dict(kw, weights_gpu_frac=0.0) for kw in (
    dict(micro_batch=32, micro_batches=8), dict(micro_batch=256, micro_batches=4),
    dict(micro_batch=1024, micro_batches=2), dict(micro_batch=256, micro_batches=4, prompt_len=256),
    dict(micro_batch=1024, micro_batches=2, prompt_len=256), dict(micro_batch=1024, micro_batches=1, prompt_len=256),
    dict(micro_batch=2048, micro_batches=2, prompt_len=256)))
"""Whole-model plans run micro-batches of ~900-1,200 (H200, 2026-12-01: 43 ms per attention call at 1,210
sequences of ~272 slots, 31 GB/s, where the curve to 256 priced 46 GB/s), and at two contexts, since a
call's time is not its KV bytes over one rate: at 1,024 sequences 40 GB/s at context 512 but 27 at 256
(2026-12-02, benchmarks/results/whole_model/h200-2026-12-02-call2/rates_at_run_shapes.json). The HRM
fits a fixed, a per-sequence and a per-byte cost to the calls (hrm.rates.cpu_attention_loop_model). Plans
run micro-batches up to ~1,800: at 1,776 the fit from settings up to 1,024 priced 62 ms a call, 74 measured.
The experts stream meanwhile, as they do in the plans that put attention on the CPU: the calls of whole runs
were 1.1-1.6x the probe's with every expert resident at the same shape (2026-12-02), largest for one
micro-batch (1,187 sequences: 53.5 ms a call, the probe 29.2 ms at 1,024)."""


OVERLAP_SETTINGS_QUICK = (dict(micro_batch=16, micro_batches=4, prompt_len=256, steps=4),)


LOOP_SHAPE_MODELS = ("qwen3-30b-a3b",)
"""Models of another KV shape whose CPU attention calls the profile also measures in the loop (at
LOOP_SHAPE_SETTINGS), so that each is priced from calls of its own bytes per slot (hrm.rates.
cpu_attention_loop_model). Qwen3-30B-A3B (4 KV heads, 2,048 bytes a slot, 8 queries per KV head): its
CPU-attention plans ran 3.4-8.9% faster than the fit to Mixtral's calls (8 KV heads, 4,096 bytes) priced,
34.8 GB/s against 31.2 (H200, 2026-12-03, calls 24-26)."""


LOOP_SHAPE_SETTINGS = tuple(dict(micro_batch=n, micro_batches=m, prompt_len=p, weights_gpu_frac=0.0)
                            for n, m, p in ((256, 4, 512), (1024, 2, 512), (1024, 2, 256), (2048, 2, 256)))
"""Two contexts, so that the per-sequence and the per-byte costs are told apart."""


LOOP_KV_FORMAT_SETTING = dict(micro_batch=2048, micro_batches=2, prompt_len=256, weights_gpu_frac=0.0)
"""Where the profile times the in-loop calls over each scaled 8-bit KV cache against bf16's (one of
OVERLAP_SETTINGS, so bf16's calls are already measured): the size of the micro-batches 8-bit plans run
(H200 call 39: one of 2,188 sequences of ~272 slots). The kernel alone gave int8 0.79 of bf16's time
(call 35); whole int8 runs took 44.1 ms a call at 2,188 sequences where bf16's in-loop calls price 46-47
(call 39), and the ratio of the kernels alone priced 37.5."""


LOOP_KV_FORMAT_SETTING_QUICK = OVERLAP_SETTINGS_QUICK[0]


MOE_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b")
"""Expert shapes the profile measures the runtime's MoE layer at: 8 large experts (14336 x 4096, top-2),
128 small ones (768 x 2048, top-8), 64 of 1024 x 2048 (top-8); the profiled model's own shape is added."""


PREFILL_REST_MODELS = MOE_MODELS + ("deepseek-v2-lite",)
"""Models whose prefill rest the profile measures, one per attention shape (hrm.rates.attention_shape):
Mixtral's GQA 32/8 x 128, Qwen3's 32/4 x 128 with QK norms, OLMoE's 16/16 x 128 (also Qwen1.5-MoE's shape),
DeepSeek-V2-Lite's MLA (16 heads of 192 over one latent of 576). DeepSeek-V2-Lite's prefill took 85.1 s
where Mixtral's rest curve priced 60.1 (H200, 2026-12-03, benchmarks/results/whole_model/h200-2026-12-03-call20)."""


MOE_TOKENS_PER_EXPERT = (32, 128, 256, 512, 1024, 2048)
"""Mixtral's prefill chunks of 1,024 to 4,096 tokens put 256 to 1,024 tokens on each expert: measured, not
interpolated (between 128 and 512 the curve doubles)."""


MOE_TOKENS_PER_EXPERT_QUICK = (128, 1024)


def moe_shape(spec) -> list[int]:
    """[hidden, intermediate, experts, top-k]: the key of a measured MoE curve."""
    return [spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.num_experts_per_tok]


def gpu_moe_flops_per_s(spec, tokens_per_expert: Sequence[float] = MOE_TOKENS_PER_EXPERT, repeats: int = 5,
                  device: str = "cuda") -> list[float]:
    """Routed-expert FLOP/s (top-k FLOPs, hrm.ops.routed_experts) of the runtime's own MoE layer by tokens
    per expert (calls of tokens_per_expert * experts / top-k tokens): runtime.moe.moe through the
    page-table view the pipeline passes, on one MoE layer of `spec` with synthetic bf16 weights, every
    expert resident. It holds what plain GEMMs do not: routing, the per-expert split and gathers, the
    combination."""
    from dataclasses import replace

    from hrm import ops

    from .. import moe
    from ..synthetic import synthesize
    from ..weights import WeightStore

    one = replace(spec, first_dense_layers=0, shared_expert_intermediate_size=0,   # routed experts only: the
                  shared_expert_gate=False).with_layers(1)                       # shared are hrm.ops.dense_ffn
    store = WeightStore(one, torch.bfloat16, device, num_resident=one.num_experts, num_pages=1)
    synthesize(store, seed=0, progress=False)
    layer, table = store.dense.layers[0], store.lookup(0, 0)
    rates = []
    for per_expert in tokens_per_expert:
        t = max(1, round(per_expert * one.num_experts / one.num_experts_per_tok))
        h = _fill_random(torch.empty(t, one.hidden_size, dtype=torch.bfloat16, device=device), 3)  # [t, hidden]
        s = _median_cuda_s(lambda: moe.moe(h, layer, table, one), repeats, sustain_s=SUSTAIN_S)
        rates.append(float(ops.routed_experts(one, t).flops) / s)
    del store
    return rates


def prefill_rest_flops(spec, tokens: Sequence[int], layer_flops_per_s: Sequence[float], prompt_len: int,
                       dense_ffn_s: Callable[[Cost, int], float], repeats: int = 5,
                       device: str = "cuda") -> list[float | None]:
    """FLOP/s of the runtime's prefill layer without its experts and dense FFN, per chunk of `tokens`
    tokens: the layer's measured time less the routed experts' (measured at the same tokens) and the dense
    FFN's (`dense_ffn_s(cost, tokens)`: the HRM's price of hrm.ops.dense_ffn, the GEMM roofline of the
    profile), over the FLOPs of hrm.ops.prefill_rest. None where the subtracted parts took as long as
    the layer."""
    from hrm import ops

    per_expert = [float(ops.tokens_per_expert(spec, t)) for t in tokens]
    moe_rates = gpu_moe_flops_per_s(spec, per_expert, repeats=repeats, device=device)
    out = []
    for t, layer_rate, moe_rate in zip(tokens, layer_flops_per_s, moe_rates):
        seqs = t // prompt_len
        layer_s = float(ops.prefill_layer(spec, seqs, prompt_len).flops) / layer_rate
        rest_s = (layer_s - float(ops.routed_experts(spec, t).flops) / moe_rate
                  - float(dense_ffn_s(ops.dense_ffn(spec, t), t)))
        out.append(float(ops.prefill_rest(spec, seqs, prompt_len).flops) / rest_s if rest_s > 0 else None)
    return out


def _random_prompts(spec, n: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """n prompts of `length` random token ids (clear of the vocabulary's first and last ten)."""
    return torch.randint(10, max(11, spec.vocab_size - 10), (n, length), generator=generator).tolist()


PREFILL_PROMPT_LEN = 256


PREFILL_SEQS = (4, 8, 16)          # sequences per chunk: 1,024 to 4,096 tokens (PREFILL_CHUNK_TOKENS)


PREFILL_SEQS_QUICK = (4, 16)


PREFILL_LAYERS = (2, 6)


PREFILL_PASS_TOKENS = 65536
"""Prompt tokens of one pass of the prefill probe (16 chunks of 4,096, 64 of 1,024). A whole run keeps the
GPU busy for seconds; a probe pass of four chunks left it idle between passes, and under the power cap the
clocks recover meanwhile: H200, 2026-12-02 (benchmarks/results/whole_model/h200-2026-12-02-call11/
prefill_gap.json, Mixtral, 4 layers): 7.67 ms per (layer, 4,096-token chunk) at 4 chunks a pass, 8.02 at 75."""


PREFILL_WEIGHTS_GPU_FRAC = 0.125
"""Resident share of the experts in the prefill probe: the rest stream during the pass, as in the plans
that offload (two expert stores, copies beside the compute). Same call: 8.54 ms per (layer, chunk) at r_w
1/8 and at 3/8, against 8.02 with every expert resident; the whole 24 GB run (r_w 1/8) spent 8.45."""


def resident_weight_bytes(spec) -> float:
    """Device bytes of a model with every expert resident (the memory account's weight parts, bf16)."""
    from dataclasses import replace

    from hrm.memory import MemoryProfile, PassShape, account
    from hrm.spec import DTypes, Workload

    m = account(replace(spec, dtypes=DTypes.named("bfloat16")), PassShape.nominal(Workload.uniform(1, 1), 1, 1, 0.0),
                1.0, profile=MemoryProfile())
    return m.gpu["non_expert_weights"] + m.gpu["resident_experts"]


_MEMORY_PROBE = """
import json, sys, torch
import runtime.engine
from runtime.memory import rss_bytes
out = {}
if sys.argv[1] == "gpu":
    a = torch.randn(1024, 1024, device="cuda")
    (a @ a).sum().item()
    del a
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    out["cuda_context_bytes"] = total - free - torch.cuda.memory_reserved()
else:
    out["cuda_context_bytes"] = 0
out["process_baseline_bytes"] = rss_bytes()
print(json.dumps(out))
"""


def memory_baseline(gpu: bool, quick: bool = False) -> dict:
    """The stack's own memory, measured in a fresh runtime process (the profiler's own process has done
    too much to stand for one): its resident set and CUDA context once the runtime is imported and the
    GPU has run a matmul; and the caching allocator's slack, reserved minus allocated at the peak of a
    small Engine pass here (Mixtral shapes, two layers; its second pass), per byte of its account's workspace."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                    os.environ.get("PYTHONPATH", "")])))
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "gpu" if gpu else "cpu"], capture_output=True,
                          text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise ProbeError(f"memory probe failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["gpu_allocator_frac"], out["allocator_probe"] = 0.0, "nothing (no GPU)"
    if gpu:
        from hrm.hf_config import load_model
        from hrm.policy import Policy

        from ..engine import Engine
        spec = load_model("mixtral-8x7b").with_layers(2)
        n, mu = (32, 16) if quick else (256, 128)
        with Engine(spec, Policy(n, mu, weights_gpu_frac=0.5), progress=False) as eng:
            prompts = _random_prompts(spec, n, 256, torch.Generator().manual_seed(0))
            eng.generate(prompts, 4)
            torch.cuda.reset_peak_memory_stats()
            eng.generate(prompts, 4)
            alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            workspace = eng.last_account.gpu["workspace"]
        out["gpu_allocator_frac"] = (reserved - alloc) / workspace
        out["allocator_probe"] = (f"runtime.Engine, mixtral-8x7b[2L], N={n} mu={mu} r_w=0.5, prompts 256, 4 tokens, "
                                  f"allocator {allocator_conf() or 'default'}")
    return out


def prefill_layers(spec, free_bytes: int, most: int = PREFILL_LAYERS[1]) -> tuple[int, int] | None:
    """The two depths prefill_costs runs at on a GPU with `free_bytes` free: up to `most` layers whose
    resident weights take at most 60% of it (the rest: activations, caches), or None where two do not fit."""
    def fits(k: int) -> bool:
        return resident_weight_bytes(spec.with_layers(spec.first_dense_layers + k)) <= 0.6 * free_bytes
    hi = max((k for k in range(2, most + 1) if fits(k)), default=None)
    if hi is None:
        return None
    return (2, hi) if hi >= 4 else (1, hi)


def prefill_costs(spec, seqs: Sequence[int] = PREFILL_SEQS, prompt_len: int = PREFILL_PROMPT_LEN,
                  pass_tokens: int = PREFILL_PASS_TOKENS, layers: tuple[int, int] = PREFILL_LAYERS,
                  repeats: int = 3) -> dict:
    """The runtime's own prefill, split into what grows with layers and what does not. runtime.Engine on
    `layers` MoE layers of `spec`, PREFILL_WEIGHTS_GPU_FRAC of the experts resident and the rest streamed,
    CPU attention (the KV goes to the host cache through the attention worker, as offloading plans do),
    micro-batches of one chunk of each of `seqs` sequences of `prompt_len` tokens, as many as make
    `pass_tokens` tokens (at least 4). The prefill seconds t(L) (the engine's own measurement, the
    median of `repeats` after a warm-up) are a line in L: its slope per chunk is the steady cost of one
    (layer, chunk), staging overlapped by the next chunk's compute; its intercept is paid once per pass
    (inputs, host staging buffers, the last layer's hand-offs).

    flops_per_s: per chunk size, hrm.ops.prefill_layer's FLOPs / seconds per (layer, chunk);
    pass_s_per_token: the median intercept per prompt token."""
    from hrm import ops
    from hrm.policy import Policy

    from ..engine import Engine

    g = torch.Generator().manual_seed(0)
    lo, hi = layers
    rates, pass_per_token = [], []
    for n in seqs:
        chunks = max(4, pass_tokens // (n * prompt_len))
        policy = Policy(batch_size=n * chunks, micro_batch_size=n, weights_gpu_frac=PREFILL_WEIGHTS_GPU_FRAC)
        prompts = _random_prompts(spec, n * chunks, prompt_len, g)
        t = {}
        for num_layers in layers:
            model = spec.with_layers(spec.first_dense_layers + num_layers)
            with Engine(model, policy, seed=0, progress=False) as eng:
                eng.generate(prompts, 1)                                   # warm-up
                if eng.device.type == "cuda":                              # and the clocks under load
                    _sustain(lambda: eng.generate(prompts, 1), SUSTAIN_S)
                t[num_layers] = statistics.median(eng.generate(prompts, 1)[1].prefill_s for _ in range(repeats))
        per_layer_chunk_s = max(t[hi] - t[lo], 1e-9) / ((hi - lo) * chunks)
        rates.append(float(ops.prefill_layer(spec, n, prompt_len).flops) / per_layer_chunk_s)
        pass_per_token.append(max(0.0, t[lo] - lo * chunks * per_layer_chunk_s) / (n * chunks * prompt_len))
    return {"flops_per_s": rates, "pass_s_per_token": statistics.median(pass_per_token)}


def runtime_overheads(spec, visits: int = VISIT_VISITS, calls: int = 200, quick: bool = False) -> dict:
    """Fixed costs of the runtime's own decode loop, at sizes where compute and transfers vanish.

    decode_visit_s_by_schedule: per schedule, decode seconds per (micro-batch, layer) visit (see
    decode_visit_costs); decode_visit_s: CGOPipe's.
    cpu_attention_call_s: one decode-attention call's fixed cost (cpu_attention_call_s).
    With CUDA also the CPU attention rate inside the pipelined loop (attention_in_pipeline)."""
    from .. import moe

    by_schedule = decode_visit_costs(spec, visits)
    grouped_size = moe.MOE_DENSE_MAX_TOKENS + 1
    grouped = {}
    if torch.cuda.is_available() and moe.grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        grouped = decode_visit_costs(spec, visits, micro_batches=8, micro_batch_size=grouped_size)
    out = {"decode_visit_s": by_schedule["cgopipe"], "decode_visit_s_by_schedule": by_schedule,
           "decode_visit_s_grouped_by_schedule": grouped, "grouped_above_tokens": moe.MOE_DENSE_MAX_TOKENS,
           "cpu_attention_call_s": cpu_attention_call_s(spec, calls),
           "visit_model": visit_probe(spec, "cgopipe", visits)[0].name}
    if torch.cuda.is_available():
        out.update(attention_in_pipeline_by_micro_batch(spec, quick))
    return out


def cpu_attention_call_s(spec, calls: int = 200) -> float:
    """Seconds of one decode-attention call of one sequence over 16 slots (runtime.cpu_attention.
    decode_attention at `spec`'s heads, bf16), submitted to the attention worker and waited for: the
    hand-off and the kernel call's fixed cost. The mean of `calls` after 10 warm-up calls."""
    from ..cpu_attention import AttentionWorker, attention_threads, decode_attention

    d = spec.head_dim
    q = torch.randn(1, spec.num_attention_heads, d).to(torch.bfloat16)    # [1, q_heads, d]
    k = torch.randn(1, spec.num_key_value_heads, 16, d).to(torch.bfloat16)
    v = torch.randn_like(k)
    starts, ends = torch.zeros(1, dtype=torch.long), torch.full((1,), 16, dtype=torch.long)
    worker = AttentionWorker(attention_threads(torch.cuda.is_available()))
    try:
        for _ in range(10):
            worker.submit(decode_attention, q, k, v, starts, ends).result()
        t0 = time.perf_counter()
        for _ in range(calls):
            worker.submit(decode_attention, q, k, v, starts, ends).result()
        return (time.perf_counter() - t0) / calls
    finally:
        worker.close()


def _probe_attention_on_gpu() -> dict:
    """Per schedule, where the visit probe runs its attention: on the GPU where the schedule allows it."""
    from hrm.schedules import SCHEDULES
    return {name: sched.attention_on_gpu[-1] for name, sched in SCHEDULES.items()}


def visit_probe(spec, schedule: str, visits: int = VISIT_VISITS, micro_batches: int = 16, micro_batch_size: int = 1,
                layers: int = VISIT_LAYERS):
    """The decode-visit probe's setting for one schedule (see decode_visit_costs): (model, policy,
    prompts, measured decode steps). `layers`: decoder layers after the model's leading dense ones."""
    from dataclasses import replace

    from hrm.policy import Policy

    one = replace(spec.with_layers(spec.first_dense_layers + layers), moe_intermediate_size=16,
                  shared_expert_intermediate_size=16 if spec.shared_expert_intermediate_size else 0)
    steps = max(2, visits // (micro_batches * layers))
    prompts = [[1 + i % 1000, 2, 3, 4] for i in range(micro_batches * micro_batch_size)]
    policy = Policy(batch_size=micro_batches * micro_batch_size, micro_batch_size=micro_batch_size,
                    weights_gpu_frac=0.5, attention_on_gpu=_probe_attention_on_gpu()[schedule], schedule=schedule)
    return one, policy, prompts, steps


def decode_visit_costs(spec, visits: int = VISIT_VISITS, micro_batches: int = 16, micro_batch_size: int = 1,
                       layers: int = VISIT_LAYERS, repeats: int = 2) -> dict[str, float]:
    """Seconds per (micro-batch, layer) visit of the runtime's decode loop under each schedule, where
    compute and transfers vanish: a `layers`-layer copy of `spec` whose experts are 16 wide (the model's
    kernel sequence with tiny expert GEMMs and weight pages), half of them streamed (two expert groups
    and a page copy per visit, as offloading plans run), micro-batches of one sequence over a few tokens,
    KV on the host, stage recording on (as measured runs record). What remains is the host's work per
    visit: kernel launches, stream and event bookkeeping, hand-offs to the attention worker. With
    `micro_batch_size` above runtime.moe.MOE_DENSE_MAX_TOKENS the MoE takes its grouped path (more
    kernels) where the device has one. The fastest of `repeats` passes counts: a pass can carry one-off
    costs its warm-up did not (H200 call 28: the first measured pass of OLMoE's grouped S4 setting took
    86 ms a visit, a profiled one after it 7.3)."""
    from ..engine import Engine

    out = {}
    for schedule in _probe_attention_on_gpu():
        one, policy, prompts, steps = visit_probe(spec, schedule, visits, micro_batches, micro_batch_size, layers)
        with Engine(one, policy, seed=0, progress=False, record=True) as eng:
            eng.generate(prompts, 3)                                       # warm-up
            decode_s = min(eng.generate(prompts, steps + 1)[1].decode_s for _ in range(repeats))
        out[schedule] = decode_s / (steps * micro_batches * one.num_hidden_layers)
    return out


def attention_in_pipeline_by_micro_batch(spec, quick: bool = False) -> dict:
    """attention_in_pipeline at each of OVERLAP_MICRO_BATCHES (the rate grows with the micro-batch: H200 run
    5 priced 28.7 GB/s from micro-batches of 32, and runs with micro-batches of 200-400 got about 36): the
    first size's figures as before, plus the curve over sizes."""
    from hrm.hf_config import load_model

    settings = OVERLAP_SETTINGS_QUICK if quick else OVERLAP_SETTINGS
    runs = [attention_in_pipeline(spec, **kw) for kw in settings]
    out = dict(runs[0])
    out["cpu_attention_overlapped_micro_batches"] = [kw["micro_batch"] for kw in settings]
    out["cpu_attention_overlapped_bytes_per_s_by_micro_batch"] = [r["cpu_attention_overlapped_bytes_per_s"] for r in runs]
    slot_bytes = {r["loop_shape"][2] for r in runs}
    for other in ([] if quick else [load_model(name) for name in LOOP_SHAPE_MODELS]):   # the loop at other KV shapes
        if other.kv_elems_per_token_layer * other.dtypes.kv_bytes not in slot_bytes:
            runs += [attention_in_pipeline(other, **kw) for kw in LOOP_SHAPE_SETTINGS]
    out["cpu_attention_loop_shapes"] = [r["loop_shape"] for r in runs]
    out["cpu_attention_loop_call_s"] = [r["loop_call_s"] for r in runs]
    setting = LOOP_KV_FORMAT_SETTING_QUICK if quick else LOOP_KV_FORMAT_SETTING
    base = runs[list(settings).index(setting)] if setting in settings else attention_in_pipeline(spec, **setting)
    out["cpu_attention_loop_time_of_compute_by_kv_format"] = kv_format_time_in_pipeline(spec, base, setting)
    return out


def kv_format_time_in_pipeline(spec, base: dict, setting: dict, formats: Sequence[str] | None = None) -> dict:
    """Per scaled 8-bit KV format (hrm.formats.SCALED_KV_FORMATS by default), the in-loop calls' time over a
    cache of that format (attention_in_pipeline of spec.with_kv_format) over bf16's calls `base` at the same
    `setting`: what hrm prices an 8-bit cache's calls at beside the loop fit of bf16's."""
    from hrm.formats import SCALED_KV_FORMATS

    return {name: attention_in_pipeline(spec.with_kv_format(name), **setting)["loop_call_s"] / base["loop_call_s"]
            for name in (SCALED_KV_FORMATS if formats is None else formats)}


def attention_in_pipeline(spec, micro_batch: int = 32, micro_batches: int = 8, prompt_len: int = 512,
                          steps: int = 8, weights_gpu_frac: float = 1.0, layers: int = 1) -> dict:
    """KV bytes/s of the CPU attention calls inside the runtime's own CGOPipe decode loop on the GPU: the
    rate the attention worker gets while the main thread launches the GPU's work on the same host (GIL
    and cores shared). `layers` MoE layers of `spec` (one by default; whole runs read KV spread over every
    layer's cache), every expert resident (the link carries activations only), micro-batches of
    `micro_batch` sequences at context ~prompt_len: large enough that the calls' fixed costs are small next
    to their KV reads. Each call's span covers KV append + attention. With `weights_gpu_frac` below 1 the
    other experts stream from pinned host memory meanwhile."""
    from hrm.policy import Policy

    from ..engine import Engine

    one = spec.with_layers(spec.first_dense_layers + layers)
    policy = Policy(batch_size=micro_batch * micro_batches, micro_batch_size=micro_batch,
                    weights_gpu_frac=weights_gpu_frac)
    g = torch.Generator().manual_seed(0)
    prompts = _random_prompts(spec, policy.batch_size, prompt_len, g)
    with Engine(one, policy, seed=0, progress=False, record=True) as eng:
        eng.generate(prompts, 3)                                           # warm-up
        _, m = eng.generate(prompts, steps + 1)
        spans = [sp for sp in eng.last_spans if sp.phase == "decode" and sp.stage == "cpu_attention"]
    kv_token_bytes = spec.kv_elems_per_token_layer * spec.dtypes.kv_bytes
    ctx_mean = prompt_len + (steps + 1) / 2.0                              # slots read, averaged over steps
    kv_bytes = len(spans) * micro_batch * ctx_mean * kv_token_bytes        # one span per (layer, micro-batch)
    busy_s = sum(sp.end_s - sp.start_s for sp in spans)
    return {"cpu_attention_overlapped_bytes_per_s": kv_bytes / busy_s if busy_s > 0 else 0.0,
            "overlap_shape": [micro_batch, prompt_len], "overlap_calls": len(spans),
            "loop_shape": [micro_batch, ctx_mean, kv_token_bytes], "loop_call_s": busy_s / max(1, len(spans)),
            "overlap_decode_visit_s": m.decode_s / (steps * micro_batches * one.num_hidden_layers)}
