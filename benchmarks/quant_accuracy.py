"""How far int8 and int4 experts move a model's output from bf16: full-size layer shapes with synthetic
weights (the runtime's own generator), a few layers of each model, on the CPU.

For each model and format, against the same model with bf16 experts (everything else identical):
  logit deviation   max |logits - logits_bf16| / max |logits_bf16| over every position of the prompts;
  top-1 agreement   the share of positions (teacher-forced on the same prompts) whose argmax is unchanged;
  greedy agreement  the share of greedy tokens equal to bf16's, up to the first difference, per prompt;
  same experts      per layer, the share of prompt tokens routed to the same top-k experts as with bf16.
Synthetic weights are Gaussian, without the outliers of trained ones, so these are best cases: round to
nearest on real checkpoints loses more, int4 most.

    python benchmarks/quant_accuracy.py --out benchmarks/results/quant_accuracy.json
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

from result_file import write_result  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from runtime import moe  # noqa: E402
from runtime.model import forward, greedy_generate  # noqa: E402
from runtime.synthetic import synthesize  # noqa: E402
from runtime.weights import WeightStore  # noqa: E402

FORMATS = ("int8", "int4")


def _outputs(spec, prompts, new_tokens, seed):
    """(logits per prompt, greedy tokens per prompt, the experts each layer routed each prompt token to)."""
    store = WeightStore(spec, torch.bfloat16, "cpu", num_resident=spec.num_experts)
    synthesize(store, seed=seed, progress=False)
    # every expert read once (dequantized where quantized), not at each forward
    experts = [[store.at_rest(layer)(e) for e in range(spec.num_experts)] for layer in range(spec.num_hidden_layers)]
    of_layer = lambda layer: experts[layer].__getitem__  # noqa: E731
    routed = []
    real_route = moe.route

    def recording_route(h, router, spec_):
        weights, ids = real_route(h, router, spec_)
        routed.append(ids.sort(dim=-1).values)
        return weights, ids
    with torch.no_grad():
        moe.route = recording_route
        try:
            logits = [forward(torch.tensor(p), store.dense, of_layer, spec).float() for p in prompts]
        finally:
            moe.route = real_route
        greedy = [greedy_generate(p, new_tokens, store.dense, of_layer, spec) for p in prompts]
    return logits, greedy, routed


def _agreement_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(model: str, layers: int, prompts, new_tokens: int, seed: int) -> list[dict]:
    spec = load_model(model).with_layers(layers)
    t0 = time.perf_counter()
    base_logits, base_greedy, base_routed = _outputs(spec, prompts, new_tokens, seed)
    rows = []
    for fmt in FORMATS:
        logits, greedy, routed = _outputs(spec.with_expert_format(fmt), prompts, new_tokens, seed)
        # per layer, the share of tokens routed to the same experts as with bf16 (calls are prompt-major)
        same_route = [[bool(x) for x in (a == b).all(dim=-1)] for a, b in zip(routed, base_routed)]
        by_layer = [sum(sum(s) for s in same_route[i::spec.num_hidden_layers]) /
                    sum(len(s) for s in same_route[i::spec.num_hidden_layers]) for i in range(spec.num_hidden_layers)]
        dev = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(logits, base_logits))
        same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, base_logits))
        positions = sum(len(p) for p in prompts)
        prefix = [_agreement_prefix(g, b) for g, b in zip(greedy, base_greedy)]
        rows.append({"model": model, "layers": layers, "expert_dtype": fmt, "prompts": len(prompts),
                     "positions": positions, "logit_max_rel_dev": dev, "top1_agreement": same / positions,
                     "greedy_tokens": new_tokens, "greedy_prefix_agreement": sum(prefix) / (new_tokens * len(prompts)),
                     "greedy_prefix_by_prompt": prefix, "same_experts_by_layer": by_layer})
        r = rows[-1]
        print(f"{model} ({layers} layers) {fmt}: logits {dev:.4f} of max, top-1 {r['top1_agreement']:.3f}, "
              f"greedy {r['greedy_prefix_agreement']:.3f}, same experts by layer "
              f"{', '.join(f'{x:.3f}' for x in by_layer)}", flush=True)
    print(f"    {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = []
    for model in args.models:
        vocab = load_model(model).vocab_size
        g = torch.Generator().manual_seed(args.seed + 1)
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        rows += measure(model, args.layers, prompts, args.new_tokens, args.seed)
    write_result(args.out, "quant_accuracy.py", argv, what="int8 / int4 experts against bf16 experts, synthetic "
                 "weights, full-size layers, CPU bf16", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
