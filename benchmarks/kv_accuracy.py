"""How far an 8-bit KV cache (int8, fp8: one fp32 scale per token and kv head, round to nearest) moves a
model's output from the same run with the cache in the compute dtype, through the runtime's own pipeline
(prefill attention on the device unchanged, decode attention on the CPU over the quantized cache).

For each model and format, against the same engine with a bf16 cache (weights and prompts identical):
  logit deviation   max |logits - logits_ref| / max |logits_ref| over every sampled position while the two
                    greedy runs have fed the same tokens (the prefill's last position and each decode step);
  top-1 agreement   the share of those positions whose argmax is the reference's;
  greedy agreement  the share of greedy tokens equal to the reference's, up to the first difference, per prompt.
Tiny models with random weights (a transformers Mixtral saved as a checkpoint, and full-width Mixtral
layers with synthetic weights) lack the outliers of trained ones: read these as best cases.

    python benchmarks/kv_accuracy.py --out benchmarks/results/kv_accuracy.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FORMATS = ("int8", "fp8")


def _run(spec, policy, prompts, new_tokens, dtype, model_dir, seed):
    """(tokens per prompt, logits of every sample call in call order [rows, vocab] as float64)."""
    import runtime.decode as decode
    import runtime.prefill as prefill
    from runtime.engine import Engine

    calls = []

    def recording(real):
        def sample(logits, *a, **kw):
            calls.append(logits.detach().double().cpu())
            return real(logits, *a, **kw)
        return sample

    saved = decode.sample, prefill.sample
    decode.sample, prefill.sample = recording(saved[0]), recording(saved[1])
    try:
        with Engine(spec, policy, model_dir=model_dir, dtype=dtype, seed=seed, progress=False) as e:
            tokens, _ = e.generate(prompts, new_tokens)
    finally:
        decode.sample, prefill.sample = saved
    return tokens, calls


def _agreement_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(spec, fmt: str, prompts, new_tokens: int, *, dtype=torch.bfloat16, model_dir=None, seed: int = 0) -> dict:
    """The three measures above for `spec` with its KV cache in `fmt` against the compute dtype's. Prompts
    of one length, one micro-batch: both runs lay the pass out alike, so sample calls pair row by row."""
    from hrm.policy import Policy
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("compare: prompts of one length (the runs pair rows by position)")
    policy = Policy(len(prompts), len(prompts))
    ref_tokens, ref = _run(spec, policy, prompts, new_tokens, dtype, model_dir, seed)
    tokens, got = _run(spec.with_kv_format(fmt), policy, prompts, new_tokens, dtype, model_dir, seed)
    same = torch.ones(len(prompts), dtype=torch.bool)           # rows fed the same tokens so far
    dev, top1, positions = 0.0, 0, 0
    for a, b in zip(got, ref):
        if same.any():
            diff = (a[same] - b[same]).abs().max() / b[same].abs().max()
            dev = max(dev, float(diff))
            agree = a.argmax(-1) == b.argmax(-1)
            top1 += int(agree[same].sum())
            positions += int(same.sum())
            same &= agree
    greedy = sum(_agreement_prefix(t, r) for t, r in zip(tokens, ref_tokens)) / sum(map(len, ref_tokens))
    return {"format": fmt, "logit_deviation": dev, "top1_agreement": top1 / positions, "positions": positions,
            "greedy_agreement": greedy, "prompts": len(prompts), "new_tokens": new_tokens}


def _prompts(n: int, length: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def main(argv=None) -> int:
    from result_file import write_result
    from hrm.hf_config import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--layers", type=int, default=2, help="layers of the full-width synthetic Mixtral (default 2)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    spec = load_model("mixtral-8x7b").with_layers(args.layers)
    prompts = _prompts(args.prompts, args.prompt_len, spec.vocab_size)
    for fmt in FORMATS:
        r = compare(spec, fmt, prompts, args.new_tokens)
        rows.append({"model": f"mixtral-8x7b ({args.layers} layers, synthetic bf16 weights)", **r})
        print(rows[-1], flush=True)
    write_result(args.out, "benchmarks/kv_accuracy.py", argv, rows=rows, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
