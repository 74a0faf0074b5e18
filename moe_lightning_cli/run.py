"""`moe-lightning run`: execute a plan with the CGOPipe runtime and measure it.

The plan file is what `moe-lightning plan` writes (optimizer.plan.Plan): its model, policy, workload
(for synthetic prompts), GPU budget (emulated on a larger GPU) and hardware (the predicted column).
Without a plan, pass --model and --policy-json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .common import fmt_bytes, fmt_s, print_json

DEFAULT_PROMPT_LEN = 128
DEFAULT_GEN_LEN = 32


@dataclass(frozen=True)
class Target:
    spec: object                 # hrm.spec.ModelSpec
    policy: object               # hrm.policy.Policy
    plan: object = None          # optimizer.plan.Plan, when run from a plan file
    hardware: object = None      # hrm.hardware.HardwareProfile for the predicted column


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a plan on this machine and measure it",
                       description="Run a plan with the CGOPipe runtime; print measured (and predicted) stage "
                                   "times and throughput; write the Measurement JSON.")
    what = p.add_argument_group("what to run")
    what.add_argument("--plan", metavar="PLAN.json", help="plan file written by `moe-lightning plan`")
    what.add_argument("--model", help="built-in model or HF config path (without --plan)")
    what.add_argument("--policy-json", metavar="JSON|FILE", help="Policy fields as JSON (without --plan)")
    what.add_argument("--num-layers", type=int, default=None, help="run only this many layers")
    weights = what.add_mutually_exclusive_group()
    weights.add_argument("--model-dir", metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    weights.add_argument("--random-weights", action="store_true", help="synthetic weights (the default)")
    prompts = p.add_argument_group("prompts")
    src = prompts.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="FILE", help="JSON list of token-id lists (or one list per line)")
    src.add_argument("--synthetic", action="store_true", help="random token prompts (the default)")
    prompts.add_argument("--num-prompts", type=int, default=None, help="synthetic prompts (default: batch size)")
    prompts.add_argument("--prompt-len", type=float, default=None,
                         help=f"synthetic: average prompt length (default: the plan's, else {DEFAULT_PROMPT_LEN})")
    prompts.add_argument("--max-prompt-len", type=int, default=None, help="synthetic: longest prompt")
    prompts.add_argument("--gen-len", type=int, default=None,
                         help=f"tokens generated per prompt (default: the plan's, else {DEFAULT_GEN_LEN})")
    prompts.add_argument("--padded", action="store_true", default=None,
                         help="pad prompts to the longest (default: the plan's, else packed)")
    ex = p.add_argument_group("execution")
    ex.add_argument("--hardware", help="hardware profile for the predicted column (default: the plan's)")
    ex.add_argument("--gpu-memory", metavar="SIZE", default=None,
                    help="emulate a GPU with this much memory, as plan's --gpu-memory (e.g. 24GiB = 24 x 2^30 "
                         "bytes, 24GB = 24 x 10^9; default: the plan's GPU budget)")
    ex.add_argument("--dtype", default=None, help="weight/activation dtype (default: the model's)")
    ex.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ex.add_argument("--top-p", type=float, default=1.0)
    ex.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed")
    ex.add_argument("--no-warmup", action="store_true",
                    help="skip the unmeasured warm-up (two micro-batches, two tokens) that loads the kernels")
    ex.add_argument("--cuda-graphs", action="store_true",
                    help="replay each decode PostAttn as a CUDA graph (fewer launches per micro-batch; GPU only)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the measurement as JSON only")
    out.add_argument("-o", "--output", metavar="MEASUREMENT.json", help="write the Measurement JSON here")
    out.add_argument("--trace", metavar="TRACE.json", help="write every stage span (for a timeline)")
    out.add_argument("--timeline", metavar="FILE.png",
                     help="draw the recorded spans as a per-resource timeline of a few decode layers "
                          "(format from the suffix)")


def _read_json_arg(text: str) -> dict:
    path = Path(text)
    return json.loads(path.read_text() if path.exists() else text)


def load_target(args) -> Target:
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from hrm.policy import Policy

    from .main import CLIError

    plan = hardware = None
    if args.plan:
        from optimizer.plan import Plan
        plan = Plan.load(args.plan)
        spec, policy, hardware = plan.spec, plan.policy, plan.hardware
    elif args.model and args.policy_json:
        spec, policy = load_model(args.model), Policy(**_read_json_arg(args.policy_json))
    else:
        raise CLIError("give --plan, or --model with --policy-json")
    if args.num_layers:
        spec = spec.with_layers(args.num_layers)
    if args.hardware:
        hardware = load_profile(args.hardware)
    return Target(spec, policy, plan, hardware)


def _workload_arg(args, plan, name: str, fallback):
    value = getattr(args, name)
    if value is not None:
        return value
    if plan is not None:
        w = plan.workload
        return {"prompt_len": w.avg_prompt_len, "max_prompt_len": w.max_prompt_len, "gen_len": w.gen_len,
                "padded": w.padded}[name]
    return fallback


def load_prompts(args, target: Target) -> list[list[int]]:
    if args.prompts:
        text = Path(args.prompts).read_text().strip()
        prompts = json.loads(text) if text.startswith("[[") or text.startswith("[\n") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
        if not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
            raise ValueError(f"{args.prompts}: expected lists of token ids")
        return prompts
    import numpy as np
    n = args.num_prompts or target.policy.batch_size
    avg = float(_workload_arg(args, target.plan, "prompt_len", DEFAULT_PROMPT_LEN))
    longest = _workload_arg(args, target.plan, "max_prompt_len", None) or int(round(avg))
    shortest = max(1, int(round(2 * avg - longest)))
    rng = np.random.default_rng(args.seed)
    lens = rng.integers(min(shortest, longest), longest + 1, size=n)
    return [rng.integers(0, target.spec.vocab_size, size=int(k)).tolist() for k in lens]


def run(args) -> int:
    from runtime.engine import Engine

    target = load_target(args)
    prompts = load_prompts(args, target)
    gen_len = int(_workload_arg(args, target.plan, "gen_len", DEFAULT_GEN_LEN))
    padded = bool(_workload_arg(args, target.plan, "padded", False))
    from hrm.units import parse_size
    budget = int(parse_size(args.gpu_memory)) if args.gpu_memory else None
    if budget is None and target.plan is not None:
        budget = int(target.plan.budgets.gpu_total_bytes)
    progress = False if args.json else None
    subject = target.plan if target.plan is not None and not args.num_layers else target.spec
    policy = None if subject is target.plan else target.policy
    with Engine(subject, policy, model_dir=args.model_dir, seed=args.seed, dtype=args.dtype,
                gpu_memory_budget_bytes=budget, progress=progress, cuda_graphs=args.cuda_graphs) as engine:
        if not args.no_warmup:
            engine.warm_up(prompts, gen_len, padded=padded)
        _, m = engine.generate(prompts, gen_len, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, padded=padded)
        spans = engine.last_spans
    if args.output:
        m.write(args.output)
    if args.trace:
        Path(args.trace).write_text(json.dumps([s.__dict__ for s in spans]))
    if args.timeline:
        from viz import save_figure, timeline_figure
        fig = timeline_figure(spans, phase="decode" if any(s.phase == "decode" for s in spans) else "prefill",
                              title=f"{m.model} on {m.device}: {m.policy}")
        save_figure(fig, args.timeline)
    est = _estimate(target, prompts, gen_len, padded) if target.hardware is not None else None
    if args.json:
        d = m.to_dict()
        if est is not None:
            d["predicted"] = est.to_dict()
        print_json(d)
        return 0
    _print(m, est)
    for path in (args.output, args.timeline):
        if path:
            print(f"wrote {path}")
    return 0


def _estimate(target: Target, prompts, gen_len: int, padded: bool):
    """The model's prediction for the prompts actually run."""
    from hrm.estimate import estimate
    from hrm.spec import Workload

    workload = Workload.from_prompt_lens([len(p) for p in prompts], gen_len, padded=padded)
    return estimate(target.spec, target.hardware, workload, target.policy)


MEASURED_TO_PREDICTED = (("gpu_compute", ("gpu",)), ("cpu_attention", ("cpu",)),
                         ("h2d_weights", None), ("h2d_hidden", None), ("h2d_kv", None), ("d2h", ("d2h",)))


def _print(m, est) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{m.model}[/] on {m.device}: {m.policy}  ({m.num_sequences} prompts, "
              f"{m.prompt_tokens} prompt tokens, {m.generated_tokens} generated)")
    t = Table(title="decode, per layer-step (stages overlap)", title_justify="left")
    t.add_column("stage")
    t.add_column("measured", justify="right")
    t.add_column("total", justify="right")
    if est is not None:
        t.add_column("predicted", justify="right")
    h2d_predicted = est.decode_layer.get("h2d") if est is not None else None
    for name, keys in MEASURED_TO_PREDICTED:
        row = [name, fmt_s(m.per_layer_step_s(name)), fmt_s(m.stage(name).total_s)]
        if est is not None:
            value = sum(est.decode_layer.get(k, 0.0) for k in keys) if keys else None
            row.append(fmt_s(value) if value is not None else "")
        t.add_row(*row)
    if est is not None:
        measured_h2d = sum(m.per_layer_step_s(n) for n in ("h2d_weights", "h2d_hidden", "h2d_kv"))
        t.add_row("h2d (all)", fmt_s(measured_h2d), "", fmt_s(h2d_predicted or 0.0))
    con.print(t)
    o = Table(title="overall", title_justify="left")
    o.add_column("")
    o.add_column("measured", justify="right")
    if est is not None:
        o.add_column("predicted", justify="right")
    rows = [("setup (per pass, not in tokens/s)", fmt_s(m.setup_s), est and "-"),
            ("prefill", fmt_s(m.prefill_s), est and fmt_s(est.prefill_s)),
            ("decode", fmt_s(m.decode_s), est and fmt_s(est.decode_s)),
            ("tokens/s", f"{m.tokens_per_s:,.1f}", est and f"{est.throughput_tok_s:,.1f}"),
            ("decode tokens/s", f"{m.decode_tokens_per_s:,.1f}", est and f"{est.decode_tok_s:,.1f}"),
            ("GPU peak", fmt_bytes(m.gpu_peak_bytes), est and fmt_bytes(est.memory.gpu_bytes)),
            ("pinned", fmt_bytes(m.pinned_bytes), est and fmt_bytes(est.memory.pinned_bytes))]
    for label, measured, predicted in rows:
        o.add_row(label, measured, *([predicted or ""] if est is not None else []))
    con.print(o)
