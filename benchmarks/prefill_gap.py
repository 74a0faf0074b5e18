"""Why does a whole-model prefill compute slower than the profile's prefill probe? (H200, 2026-12-02:
Mixtral's whole runs spent 8.4 ms of GPU compute per (layer, 4,096-token chunk) against the probe's 7.6.)

The profile's probe (runtime.probe.calibration.prefill_costs) ran runtime.Engine with every expert
resident and four micro-batches of one chunk each (until 2026-12-02; this script's first setting). A whole run has one or two micro-batches of 55-110
chunks and streams most experts. This runs runtime.Engine's prefill on a few layers of the model in
settings between the two, and reports per setting the GPU compute per (layer, chunk) (the engine's own
stage times), the prefill wall time per (layer, chunk), and the rate in TFLOP/s of hrm.ops.prefill_layer.

    python benchmarks/prefill_gap.py --out benchmarks/results/prefill_gap-h200.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
import runtime.prefill  # noqa: E402
from hrm import ops  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import PREFILL_CHUNK_TOKENS, Policy  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.probe.base import SUSTAIN_S, _sustain  # noqa: E402
from runtime.probe.calibration import _random_prompts  # noqa: E402

PROMPT_LEN = 256
SEQS_PER_CHUNK = PREFILL_CHUNK_TOKENS // PROMPT_LEN

SETTINGS = (
    ("probe: 4 micro-batches of 1 chunk, all resident", dict(batch_size=4 * SEQS_PER_CHUNK, micro_batch_size=SEQS_PER_CHUNK,
                                                              weights_gpu_frac=1.0)),
    ("4 micro-batches of 1 chunk, r_w 1/8", dict(batch_size=4 * SEQS_PER_CHUNK, micro_batch_size=SEQS_PER_CHUNK,
                                                 weights_gpu_frac=0.125)),
    ("1 micro-batch of 75 chunks, all resident", dict(batch_size=1205, micro_batch_size=1205, weights_gpu_frac=1.0)),
    ("1 micro-batch of 75 chunks, r_w 1/8 (the 24 GB plan)", dict(batch_size=1205, micro_batch_size=1205,
                                                                  weights_gpu_frac=0.125)),
    ("1 micro-batch of 75 chunks, r_w 1/8, each layer's experts in one copy (before 2026-12-02)",
     dict(batch_size=1205, micro_batch_size=1205, weights_gpu_frac=0.125, whole_pages=True)),
    ("2 micro-batches of 55 chunks, r_w 3/8 (the 48 GB plan)", dict(batch_size=1753, micro_batch_size=877,
                                                                    weights_gpu_frac=0.375)),
    ("1 micro-batch of 75 chunks, all resident, KV on the GPU", dict(batch_size=1205, micro_batch_size=1205,
                                                                     weights_gpu_frac=1.0, kv_gpu_frac=1.0,
                                                                     attention_on_gpu=True, schedule="s4")),
)


def measure(spec, name: str, kw: dict, layers: int, repeats: int) -> dict:
    kw = dict(kw)
    piece_min = runtime.prefill.PREFILL_PIECE_MIN_BYTES
    if kw.pop("whole_pages", False):                        # one piece per layer: the old prefill's copy
        runtime.prefill.PREFILL_PIECE_MIN_BYTES = 1 << 62
    try:
        return _measure(spec, name, kw, layers, repeats)
    finally:
        runtime.prefill.PREFILL_PIECE_MIN_BYTES = piece_min


def _measure(spec, name: str, kw: dict, layers: int, repeats: int) -> dict:
    policy = Policy(**kw)
    g = torch.Generator().manual_seed(0)
    prompts = _random_prompts(spec, policy.batch_size, PROMPT_LEN, g)
    model = spec.with_layers(spec.first_dense_layers + layers)
    t0 = time.perf_counter()
    with Engine(model, policy, seed=0, progress=False) as eng:
        setup_s = time.perf_counter() - t0
        eng.generate(prompts, 1)                                              # warm-up
        _sustain(lambda: eng.generate(prompts, 1), SUSTAIN_S)
        runs = [eng.generate(prompts, 1)[1] for _ in range(repeats)]
    chunk_flops = float(ops.prefill_layer(spec, SEQS_PER_CHUNK, PROMPT_LEN).flops)
    layer_chunks = layers * policy.batch_size / SEQS_PER_CHUNK
    compute_s = statistics.median(m.stage("gpu_compute", "prefill").total_s for m in runs) / layer_chunks
    wall_s = statistics.median(m.prefill_s for m in runs) / layer_chunks
    row = {"setting": name, "policy": kw, "layers": layers, "setup_s": setup_s,
           "gpu_compute_ms_per_layer_chunk": 1e3 * compute_s, "prefill_ms_per_layer_chunk": 1e3 * wall_s,
           "compute_tflops": chunk_flops / compute_s / 1e12, "wall_tflops": chunk_flops / wall_s / 1e12,
           "prefill_stages_s": {s.name: s.total_s for s in runs[-1].stages if s.phase == "prefill"}}
    print(f"{name}, {layers} layers: compute {row['gpu_compute_ms_per_layer_chunk']:.2f} ms "
          f"({row['compute_tflops']:.0f} TFLOP/s), wall {row['prefill_ms_per_layer_chunk']:.2f} ms "
          f"({row['wall_tflops']:.0f}) per (layer, chunk)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, nargs="+", default=[4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_gap.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    spec = load_model(args.model)
    rows = [measure(spec, name, kw, layers, args.repeats) for layers in args.layers for name, kw in SETTINGS]
    write_result(args.out, "benchmarks/prefill_gap.py", argv, model=args.model, prompt_len=PROMPT_LEN, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
