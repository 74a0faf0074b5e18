"""The profile's rates at the shapes whole-model runs use, to find where a prediction misses: the CPU
attention inside the CGOPipe loop by (model, micro-batch, context, weights streamed or resident), and the
runtime's prefill per (layer, chunk) at each model's own shapes (the profile measures Mixtral's).

    python benchmarks/rates_at_run_shapes.py --out benchmarks/results/whole_model/rates_at_run_shapes.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
from hrm import ops  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from runtime.probe.calibration import attention_in_pipeline, prefill_costs  # noqa: E402

# (model, micro-batch, micro-batches, context, weights_gpu_frac, layers)
ATTENTION = [("mixtral-8x7b", 1024, 2, 512, 1.0, 1), ("mixtral-8x7b", 1024, 2, 256, 1.0, 1),
             ("mixtral-8x7b", 456, 2, 256, 1.0, 1), ("mixtral-8x7b", 1024, 2, 256, 0.0, 1),
             ("qwen3-30b-a3b", 1024, 2, 256, 1.0, 1), ("qwen3-30b-a3b", 1370, 2, 256, 0.0, 1)]
# Does the call slow down when the KV is spread over many layers' caches, as in a whole run? (2026-12-02
# calls 10-12: 38.2 / 40.0 / 48.6 ms per call at 1,200 sequences on three machines, the one-layer probe
# priced ~36 on each)
ATTENTION_DEPTH = [("mixtral-8x7b", 1200, 1, 256, 0.0, 1), ("mixtral-8x7b", 1200, 1, 256, 0.0, 8)]
PREFILL = [("mixtral-8x7b", 16), ("qwen3-30b-a3b", 16), ("olmoe-1b-7b", 16)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--depth", action="store_true", help="only the CPU attention at one and eight layers' KV")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("rates_at_run_shapes: needs CUDA")
    rows = []
    for model, mb, n_mb, ctx, r_w, layers in (ATTENTION_DEPTH if args.depth else ATTENTION):
        t0 = time.perf_counter()
        spec = load_model(model)
        r = attention_in_pipeline(spec, micro_batch=mb, micro_batches=n_mb, prompt_len=ctx, weights_gpu_frac=r_w,
                                  layers=layers)
        kv_token_bytes = spec.kv_elems_per_token_layer * spec.dtypes.kv_bytes
        row = {"what": "cpu_attention_in_loop", "model": model, "micro_batch": mb, "micro_batches": n_mb,
               "ctx": ctx, "weights_gpu_frac": r_w, "layers": layers, "gb_per_s": r["cpu_attention_overlapped_bytes_per_s"] / 1e9,
               "ms_per_call": mb * (ctx + 4.5) * kv_token_bytes / r["cpu_attention_overlapped_bytes_per_s"] * 1e3,
               "gqa_group": spec.num_attention_heads // spec.num_key_value_heads,
               "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for model, seqs in ([] if args.skip_prefill or args.depth else PREFILL):
        t0 = time.perf_counter()
        spec = load_model(model)
        r = prefill_costs(spec, (seqs,), layers=(2, 4), repeats=2)
        flops = float(ops.prefill_layer(spec, seqs, 256).flops)
        row = {"what": "prefill_layer_chunk", "model": model, "chunk_tokens": seqs * 256,
               "tflops": r["flops_per_s"][0] / 1e12, "ms_per_layer_chunk": flops / r["flops_per_s"][0] * 1e3,
               "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result(args.out, "rates_at_run_shapes.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
