"""Where the runtime's MoE layer spends its GPU time, kernel by kernel: runtime.moe.moe on one layer of each
model's expert shape (every expert resident, or split between two stores as an offloading plan has them),
at a prefill chunk's tokens, under torch.profiler. It answers why a fine-grained model's MoE runs far below
the GEMM rate (Qwen3-30B-A3B: 126 TFLOP/s against 768 for a plain bf16 GEMM, H200 2026-12-02).

    python benchmarks/moe_kernels.py --out benchmarks/results/moe_kernels-h200.json
"""
from __future__ import annotations

import argparse
import sys
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


def profile_layer(name: str, tokens: int, resident_frac: float, host_sync_ok: bool, top: int = 12) -> dict:
    spec = replace(load_model(name), first_dense_layers=0).with_layers(1)
    resident = round(resident_frac * spec.num_experts)
    store = WeightStore(spec, torch.bfloat16, "cuda", num_resident=resident, num_pages=1)
    synthesize(store, seed=0, progress=False)
    for page in store.page_table.pages:                    # the streamed experts, as the pipeline pages them in
        store.copy_page(0, 0, page)
    layer, table = store.dense.layers[0], store.lookup(0, 0)
    h = (torch.randn(tokens, spec.hidden_size, device="cuda") * 0.02).to(torch.bfloat16)
    for _ in range(3):
        moe.moe(h, layer, table, spec, host_sync_ok)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 10
    for _ in range(reps):
        moe.moe(h, layer, table, spec, host_sync_ok)
    end.record()
    torch.cuda.synchronize()
    layer_s = start.elapsed_time(end) / 1e3 / reps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            moe.moe(h, layer, table, spec, host_sync_ok)
        torch.cuda.synchronize()
    kernels = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    flops = float(ops.routed_experts(spec, tokens).flops)
    return {"model": name, "tokens": tokens, "resident": resident, "experts": spec.num_experts,
            "host_sync_ok": host_sync_ok, "layer_ms": layer_s * 1e3, "routed_tflops": flops / layer_s / 1e12,
            "kernels": [{"name": e.key[:120], "calls_per_layer": e.count / reps,
                         "ms_per_layer": e.device_time_total / 1e3 / reps} for e in kernels]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_kernels: needs CUDA")
    rows = []
    for name in MOE_MODELS:
        for frac, sync in ((1.0, False), (0.25, False), (0.25, True)):
            r = profile_layer(name, args.tokens, frac, sync)
            rows.append(r)
            print(f"{name} resident {r['resident']}/{r['experts']} {'exact' if sync else 'sync-free'}: "
                  f"{r['layer_ms']:.2f} ms, {r['routed_tflops']:.0f} TFLOP/s; top: "
                  + ", ".join(f"{k['name'][:40]} {k['ms_per_layer']:.2f}" for k in r["kernels"][:4]), flush=True)
    write_result(args.out, "moe_kernels.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
