"""Where a whole run's GPU time goes, kernel by kernel, in a plan's own setting: runtime.Engine on a few
layers of the plan's model with the plan's policy, one pass under torch.profiler, the kernels summed per
(layer, prefill chunk) and per (layer, decode step) and grouped (GEMM, attention, MoE routing and
permutation, copies, the rest), beside what the HRM prices each part. It answers why a whole run misses
its prediction in one phase (H200 2026-12-03: DeepSeek-V2-Lite's prefill took 5.4 ms of GPU compute per
(layer, chunk) against 3.2 priced; OLMoE's decode 9.6 ms per layer-step against 6.35).

    python benchmarks/layer_kernels.py --plan PLAN.json [PLAN.json ...] --layers 2 --out layer_kernels.json

Decode kernels are the pass with `--gen` tokens less the pass with one (the prefill and the first token);
`gpu_busy_frac` is the kernels' summed time over the phase's wall time (below 1: the GPU waits on the host).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
from hrm import ops  # noqa: E402
from hrm.policy import PREFILL_CHUNK_TOKENS, Policy  # noqa: E402
from optimizer.plan import spec_from_dict  # noqa: E402
from runtime import attention  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.probe.calibration import _random_prompts  # noqa: E402

GROUPS = (("gemm", ("gemm", "cutlass", "grouped", "sm90_xmma", "nvjet", "cublas")),
          ("attention", ("fmha", "flash", "attention", "softmax", "efficient")),
          ("copy", ("memcpy", "memset", "copy")),
          ("routing", ("sort", "topk", "scatter", "gather", "index", "cumsum", "histc", "bincount", "radix")))
"""Kernel groups, by words in the kernel's lower-case name (first match); the rest is 'elementwise/other'."""


def group_of(kernel: str) -> str:
    low = kernel.lower()
    for name, words in GROUPS:
        if any(w in low for w in words):
            return name
    return "elementwise/other"


def _profiled_pass(eng: Engine, prompts, gen: int) -> tuple[dict[str, tuple[int, float]], float, object]:
    """One generate under the profiler: kernel name -> (calls, device ms), the wall s, the measurement."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    sync()
    with torch.profiler.profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        _, m = eng.generate(prompts, gen)
        sync()
        wall = time.perf_counter() - t0
    ms = (lambda e: e.device_time_total / 1e3) if cuda else (lambda e: e.self_cpu_time_total / 1e3)
    return {e.key: (e.count, ms(e)) for e in prof.key_averages() if ms(e) > 0}, wall, m


def _summary(kernels: dict[str, tuple[int, float]], units: float, top: int) -> dict:
    groups: dict[str, float] = defaultdict(float)
    for k, (_, ms) in kernels.items():
        groups[group_of(k)] += ms / units
    ranked = sorted(kernels.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return {"kernel_ms": sum(ms for _, ms in kernels.values()) / units,
            "groups_ms": {g: round(v, 4) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [{"name": k[:160], "group": group_of(k), "calls": c / units, "ms": ms / units}
                    for k, (c, ms) in ranked]}


def _priced_prefill_parts(spec, seqs_per_chunk: int, prompt_len: int) -> dict:
    """The HRM's FLOPs per (layer, chunk) by part (GFLOP): what the kernels' groups are set against."""
    tokens = seqs_per_chunk * prompt_len
    parts = {"pre_attention": ops.pre_attention(spec, tokens), "attention": ops.attention(spec, seqs_per_chunk, prompt_len, 0),
             "o_proj": ops.o_proj(spec, tokens), "routed_experts": ops.routed_experts(spec, tokens),
             "whole_layer": ops.prefill_layer(spec, seqs_per_chunk, prompt_len)}
    return {k: float(v.flops) / 1e9 for k, v in parts.items()}


def profile_plan(path: Path, layers: int, prompt_len: int, gen: int, top: int, micro_batches: int) -> dict:
    plan = json.loads(path.read_text())
    spec = spec_from_dict(plan["model"]["spec"])
    model = spec.with_layers(spec.first_dense_layers + layers)
    policy = Policy(**plan["policy"])
    policy = replace(policy, batch_size=min(policy.batch_size, micro_batches * policy.micro_batch_size))
    prompts = _random_prompts(model, policy.batch_size, prompt_len, torch.Generator().manual_seed(0))
    with Engine(model, policy, seed=0, progress=False) as eng:
        eng.generate(prompts, 2)                                              # warm-up (graphs captured)
        pre_k, pre_wall, pre_m = _profiled_pass(eng, prompts, 1)
        all_k, all_wall, all_m = _profiled_pass(eng, prompts, gen)
    seqs_per_chunk = max(1, PREFILL_CHUNK_TOKENS // prompt_len)
    sizes = [min(policy.micro_batch_size, policy.batch_size - i) for i in range(0, policy.batch_size, policy.micro_batch_size)]
    layer_chunks = model.num_hidden_layers * sum(math.ceil(n / seqs_per_chunk) for n in sizes)
    steps = model.num_hidden_layers * (gen - 1)
    dec_k = {}
    for k, (c, ms) in all_k.items():
        c0, ms0 = pre_k.get(k, (0, 0.0))
        if ms - ms0 > 0:
            dec_k[k] = (c - c0, ms - ms0)
    prefill = _summary(pre_k, layer_chunks, top)
    decode = _summary(dec_k, steps, top)
    prefill.update(wall_ms=1e3 * pre_m.prefill_s / layer_chunks,
                   gpu_compute_ms=1e3 * pre_m.stage("gpu_compute", "prefill").total_s / layer_chunks,
                   priced_gflop=_priced_prefill_parts(model, seqs_per_chunk, prompt_len))
    prefill["gpu_busy_frac"] = prefill["kernel_ms"] / prefill["wall_ms"]
    decode.update(wall_ms=1e3 * all_m.decode_s / steps)
    decode["gpu_busy_frac"] = decode["kernel_ms"] / decode["wall_ms"]
    row = {"plan": path.name, "model": spec.name, "mla_prefill_kernel": attention.MLA_PREFILL_KERNEL, "policy": asdict(policy), "layers": layers,
           "prompt_len": prompt_len, "gen": gen, "per": {"prefill": "(layer, chunk)", "decode": "(layer, step)"},
           "prefill": prefill, "decode": decode, "pass_wall_s": [pre_wall, all_wall]}
    print(f"{spec.name} {layers}L {asdict(policy)}:\n  prefill {prefill['wall_ms']:.2f} ms per (layer, chunk), "
          f"kernels {prefill['kernel_ms']:.2f} {prefill['groups_ms']}\n  decode {decode['wall_ms']:.2f} ms per "
          f"(layer, step), kernels {decode['kernel_ms']:.2f} {decode['groups_ms']}", flush=True)
    for phase in ("prefill", "decode"):
        for k in row[phase]["top"][:6]:
            print(f"    {phase} {k['ms']:.3f} ms x{k['calls']:.1f} [{k['group']}] {k['name'][:100]}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, nargs="+", required=True, help="plan JSON files (moe-lightning plan -o)")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers to run (after the plan's leading dense ones)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen", type=int, default=5, help="tokens per sequence in the decode pass (>= 2)")
    ap.add_argument("--micro-batches", type=int, default=2, help="at most this many of the plan's micro-batches")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--mla-prefill", choices=("matmul", "sdpa"), nargs="+", default=None,
                    help="MLA plans: run each under these runtime.attention.MLA_PREFILL_KERNEL (default the runtime's)")
    ap.add_argument("--cpu", action="store_true", help="a smoke test on the CPU (its times mean nothing)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("layer_kernels.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.gen < 2:
        print("layer_kernels.py: --gen must be at least 2", file=sys.stderr)
        return 2
    plans = {}
    for path in args.plan:
        try:
            plans[path] = json.loads(path.read_text())["model"]["spec"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"layer_kernels.py: {path}: not a readable plan file ({e.__class__.__name__}: {e})", file=sys.stderr)
            return 2
    rows = []
    for path, spec in plans.items():
        mla = spec.get("attention") == "mla"
        for kernel in (args.mla_prefill if mla and args.mla_prefill else [attention.MLA_PREFILL_KERNEL]):
            attention.MLA_PREFILL_KERNEL = kernel
            rows.append(profile_plan(path, args.layers, args.prompt_len, args.gen, args.top, args.micro_batches))
    write_result(args.out, "benchmarks/layer_kernels.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
