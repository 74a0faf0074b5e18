"""Where the runtime's MoE layer spends its GPU time, kernel by kernel: runtime.moe.moe on one layer of each
model's expert shape (every expert resident, or split between two stores as an offloading plan has them),
at a prefill chunk's tokens, under torch.profiler. It answers why a fine-grained model's MoE runs far below
the GEMM rate (Qwen3-30B-A3B: 126 TFLOP/s against 768 for a plain bf16 GEMM, H200 2026-12-02).

    python benchmarks/moe_kernels.py --out benchmarks/results/moe_kernels-h200.json
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
from hrm import ops  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from runtime import moe  # noqa: E402
from runtime.probe.calibration import MOE_MODELS  # noqa: E402
from runtime.synthetic import synthesize  # noqa: E402
from runtime.weights import WeightStore  # noqa: E402


GEMM_KERNEL_WORDS = ("gemm", "cutlass", "grouped", "sm90_xmma", "nvjet")
"""A kernel whose name has one of these (lower case) is counted as a GEMM of the layer."""


def profile_layer(name: str, tokens: int, resident_frac: float, host_sync_ok: bool, slice_tokens: int | None = None,
                  device: str = "cuda", top: int = 12) -> dict:
    """One MoE layer of `name`'s expert shape at `tokens` tokens: its time, its routed-expert TFLOP/s, the
    share of its GPU time in GEMM kernels and their own TFLOP/s, and the `top` kernels. `slice_tokens`:
    the grouped path's slice (default the runtime's, hrm.policy.moe_grouped_slice_tokens)."""
    default = moe.moe_grouped_slice_tokens
    if slice_tokens is not None:
        moe.moe_grouped_slice_tokens = lambda _spec: slice_tokens
    try:
        return _profile_layer(name, tokens, resident_frac, host_sync_ok, device, top)
    finally:
        moe.moe_grouped_slice_tokens = default


def one_layer(name: str, tokens: int, resident_frac: float, device: str = "cuda"):
    """(spec, layer, page table, hidden [tokens, hidden]) of one MoE layer of `name`'s expert shape, synthetic
    bf16, `resident_frac` of its experts resident and the rest paged in as the pipeline pages them."""
    spec = replace(load_model(name), first_dense_layers=0).with_layers(1)
    resident = round(resident_frac * spec.num_experts)
    store = WeightStore(spec, torch.bfloat16, device, num_resident=resident, num_pages=1)
    synthesize(store, seed=0, progress=False)
    for page in store.page_table.pages:                    # the streamed experts, as the pipeline pages them in
        store.copy_page(0, 0, page)
    h = (torch.randn(tokens, spec.hidden_size, device=device) * 0.02).to(torch.bfloat16)
    return spec, store.dense.layers[0], store.lookup(0, 0), h


def _profile_layer(name: str, tokens: int, resident_frac: float, host_sync_ok: bool, device: str, top: int) -> dict:
    spec, layer, table, h = one_layer(name, tokens, resident_frac, device)
    resident = round(resident_frac * spec.num_experts)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        moe.moe(h, layer, table, spec, host_sync_ok)
    sync()
    reps = 10 if cuda else 1
    t0 = time.perf_counter()
    for _ in range(reps):
        moe.moe(h, layer, table, spec, host_sync_ok)
    sync()
    layer_s = (time.perf_counter() - t0) / reps
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(reps):
            moe.moe(h, layer, table, spec, host_sync_ok)
        sync()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 or not cuda]
    ms = {e.key: (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3 / reps for e in events}
    gemm_ms = sum(v for k, v in ms.items() if any(w in k.lower() for w in GEMM_KERNEL_WORDS))
    flops = float(ops.routed_experts(spec, tokens).flops)
    kernels = sorted(events, key=lambda e: ms[e.key], reverse=True)[:top]
    return {"model": name, "tokens": tokens, "slice_tokens": moe.moe_grouped_slice_tokens(spec), "resident": resident,
            "experts": spec.num_experts, "host_sync_ok": host_sync_ok, "layer_ms": layer_s * 1e3,
            "routed_tflops": flops / layer_s / 1e12, "kernel_ms": sum(ms.values()), "gemm_ms": gemm_ms,
            "gemm_tflops": flops / (gemm_ms / 1e3) / 1e12 if gemm_ms else None,
            "kernels": [{"name": e.key[:160], "calls_per_layer": e.count / reps, "ms_per_layer": ms[e.key]}
                        for e in kernels]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--slice-tokens", type=int, nargs="+", default=None,
                   help="tokens per grouped-GEMM slice (default each model's, hrm.policy.moe_grouped_slice_tokens)")
    p.add_argument("--models", nargs="+", default=list(MOE_MODELS))
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (CPU times mean nothing)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moe_kernels: needs CUDA (or --device cpu)")
    rows = []
    for name in args.models:
        for slice_tokens in args.slice_tokens or [None]:
            for frac, sync in ((1.0, False), (0.25, False), (0.25, True)):
                r = profile_layer(name, args.tokens, frac, sync, slice_tokens, args.device)
                rows.append(r)
                print(f"{name} slice {r['slice_tokens']} resident {r['resident']}/{r['experts']} "
                      f"{'exact' if sync else 'sync-free'}: {r['layer_ms']:.2f} ms, {r['routed_tflops']:.0f} "
                      f"TFLOP/s; GEMMs {r['gemm_ms']:.2f} of {r['kernel_ms']:.2f} ms kernel time; top: "
                      + ", ".join(f"{k['name'][:40]} {k['ms_per_layer']:.2f}" for k in r["kernels"][:4]),
                      flush=True)
    write_result(args.out, "moe_kernels.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
