"""`moe-lightning run`: execute a plan with the CGOPipe runtime and measure it.

The plan file is what `moe-lightning plan` writes (optimizer.plan.Plan): its model, policy, workload
(for synthetic prompts), GPU budget (emulated on a larger GPU) and hardware (the predicted column).
Without a plan, pass --model and --policy-json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .common import COUNT, SHARE, add_expert_dtype_arg, add_kv_dtype_arg, check_outputs, fmt_bytes, fmt_s, model_arg, print_json, size, value

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
    what.add_argument("--num-layers", type=COUNT, default=None, help="run only this many layers")
    add_expert_dtype_arg(what, " (without --plan: a plan carries its own)")
    add_kv_dtype_arg(what, " (without --plan: a plan carries its own)")
    weights = what.add_mutually_exclusive_group()
    weights.add_argument("--model-dir", metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    weights.add_argument("--random-weights", action="store_true", help="synthetic weights (the default)")
    prompts = p.add_argument_group("prompts")
    src = prompts.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="FILE", help="JSON list of token-id lists (or one list per line)")
    src.add_argument("--synthetic", action="store_true", help="random token prompts (the default)")
    prompts.add_argument("--num-prompts", type=COUNT, default=None, help="synthetic prompts (default: batch size)")
    prompts.add_argument("--prompt-len", type=value(), default=None,
                         help=f"synthetic: average prompt length (default: the plan's, else {DEFAULT_PROMPT_LEN})")
    prompts.add_argument("--max-prompt-len", type=COUNT, default=None, help="synthetic: longest prompt")
    prompts.add_argument("--gen-len", type=COUNT, default=None,
                         help=f"tokens generated per prompt (default: the plan's, else {DEFAULT_GEN_LEN})")
    prompts.add_argument("--padded", action="store_true", default=None,
                         help="pad prompts to the longest (default: the plan's, else packed)")
    ex = p.add_argument_group("execution")
    ex.add_argument("--hardware", help="hardware profile for the predicted column (default: the plan's)")
    ex.add_argument("--gpu-memory", metavar="SIZE", default=None, type=size,
                    help="emulate a GPU with this much memory, as plan's --gpu-memory (e.g. 24GiB = 24 x 2^30 "
                         "bytes, 24GB = 24 x 10^9; per GPU under torchrun; default: the plan's GPU budget)")
    ex.add_argument("--dtype", default=None, help="weight/activation dtype (default: the model's)")
    ex.add_argument("--temperature", type=value(positive=False), default=0.0, help="0: greedy (default)")
    ex.add_argument("--top-p", type=SHARE, default=1.0)
    ex.add_argument("--seed", type=value(int, positive=False), default=0, help="weights, prompts and sampling seed")
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


def read_policy(text: str):
    """--policy-json: Policy fields as JSON text or in a file; known fields only, each of its type."""
    from hrm.checks import load_json, read_text, typed
    from hrm.policy import Policy

    try:
        is_file = Path(text).is_file()
    except OSError:                      # JSON too long for a file name
        is_file = False
    where = f"--policy-json {text}" if is_file else "--policy-json"
    return typed(Policy, load_json(read_text(text, "--policy-json file") if is_file else text, where), where)


def load_target(args) -> Target:
    from hrm.hardware import load_profile
    from .main import CLIError

    plan = hardware = None
    if args.plan:
        from optimizer.plan import Plan
        plan = Plan.load(args.plan)
        spec, policy, hardware = plan.spec, plan.policy, plan.hardware
    elif args.model and args.policy_json:
        spec, policy = model_arg(args.model), read_policy(args.policy_json)
    else:
        raise CLIError("give --plan, or --model with --policy-json")
    if args.expert_dtype is not None:
        if plan is not None:
            raise CLIError("--expert-dtype: the plan fixes the experts' format (make it with plan --expert-dtype)")
        spec = spec.with_expert_format(args.expert_dtype)
    if args.kv_dtype is not None:
        if plan is not None:
            raise CLIError("--kv-dtype: the plan fixes the KV cache's format (make it with plan --kv-dtype)")
        spec = spec.with_kv_format(args.kv_dtype)
    if args.num_layers is not None:
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
        return read_prompts(args.prompts, target.spec.vocab_size)
    import numpy as np
    from hrm.spec import Workload

    n = args.num_prompts if args.num_prompts is not None else target.policy.batch_size
    avg = float(_workload_arg(args, target.plan, "prompt_len", DEFAULT_PROMPT_LEN))
    longest = _workload_arg(args, target.plan, "max_prompt_len", None) or int(round(avg))
    Workload(avg, longest, 1)                    # the average within the longest, both positive
    shortest = max(1, int(round(2 * avg - longest)))
    rng = np.random.default_rng(args.seed)
    lens = rng.integers(min(shortest, longest), longest + 1, size=n)
    return [rng.integers(0, target.spec.vocab_size, size=int(k)).tolist() for k in lens]


def read_prompts(path, vocab_size: int) -> list[list[int]]:
    """A JSON list of token-id lists, or one list per line; every id an integer in [0, vocab_size)."""
    from hrm.checks import load_json, need, read_text

    text = read_text(path, "prompts file").strip()
    if text.startswith("[[") or "\n" not in text:
        data = load_json(text, f"prompts file {path}")
        prompts = data if isinstance(data, list) and data and isinstance(data[0], list) else [data]
    else:
        prompts = [load_json(line, f"prompts file {path} line {i}")
                   for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts or prompts == [[]]:
        raise ValueError(f"prompts file {path}: no prompts")
    for i, p in enumerate(prompts):
        need(p, list, f"prompts file {path}: prompt {i}")
        if not p:
            raise ValueError(f"prompts file {path}: prompt {i} is empty")
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"prompts file {path}: prompt {i}: token id {t!r} is not an integer in the "
                                 f"vocabulary [0, {vocab_size})")
    return prompts


def run(args) -> int:
    import torch

    from hrm.atomic import Outputs
    from hrm.checks import check_context
    from hrm.units import parse_size
    from runtime import parallel
    from runtime.engine import Engine, check_gpus

    check_outputs(args.output, args.trace, args.timeline)
    target = load_target(args)
    tp = parallel.from_environment("cuda" if torch.cuda.is_available() else "cpu")     # under torchrun
    check_gpus(target.hardware, tp.world if tp else 1, "--hardware" if args.hardware else "the plan's hardware")
    prompts = load_prompts(args, target)
    gen_len = int(_workload_arg(args, target.plan, "gen_len", DEFAULT_GEN_LEN))
    check_context(target.spec, max(len(p) for p in prompts), gen_len)
    padded = bool(_workload_arg(args, target.plan, "padded", False))
    budget = int(parse_size(args.gpu_memory)) * (tp.world if tp else 1) if args.gpu_memory else None   # per GPU
    if budget is None and target.plan is not None:
        budget = int(target.plan.budgets.gpu_total_bytes)
    progress = False if args.json else None
    subject = target.plan if target.plan is not None and not args.num_layers else target.spec
    policy = None if subject is target.plan else target.policy
    with Engine(subject, policy, model_dir=args.model_dir, seed=args.seed, dtype=args.dtype,
                gpu_memory_budget_bytes=budget, progress=progress, cuda_graphs=args.cuda_graphs,
                tensor_parallel=tp) as engine:
        if not args.no_warmup:
            engine.warm_up(prompts, gen_len, padded=padded)
        _, m = engine.generate(prompts, gen_len, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, padded=padded)
        spans = engine.last_spans
    parallel.shutdown(tp)      # after a failure torchrun stops the other ranks: no barrier they would not reach
    if tp is not None and tp.rank != 0:          # rank 0 writes and prints; every rank made the same tokens
        return 0
    with Outputs() as out:                       # the three files replaced together, once all are made
        if args.output:
            out.add_text(args.output, m.to_json())
        if args.trace:
            out.add_text(args.trace, json.dumps([s.__dict__ for s in spans]))
        if args.timeline:
            from viz import save_figure, timeline_figure
            fig = timeline_figure(spans, phase="decode" if any(s.phase == "decode" for s in spans) else "prefill",
                                  title=f"{m.model} on {m.device}: {m.policy}")
            save_figure(fig, args.timeline, outputs=out)
        out.commit()
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


def _estimate(target: Target, prompts, gen_len: int, padded: bool) -> "RunPrediction":
    """The model's prediction for the prompts actually run: the engine's passes of the policy's N in order,
    each priced at its own size and prompt lengths."""
    from hrm.estimate import estimate
    from hrm.spec import Workload

    n = target.policy.batch_size
    passes = []
    for first in range(0, len(prompts), n):
        lens = [len(p) for p in prompts[first:first + n]]
        passes.append(estimate(target.spec, target.hardware, Workload.from_prompt_lens(lens, gen_len, padded=padded),
                               target.policy.for_batch(len(lens))))
    return RunPrediction(tuple(passes))


@dataclass(frozen=True)
class RunPrediction:
    """The estimates of a run's passes, and their totals; the first (largest) pass stands for the per-layer
    stages and the memory."""
    passes: tuple

    @property
    def prefill_s(self) -> float:
        return sum(e.prefill_s for e in self.passes)

    @property
    def decode_s(self) -> float:
        return sum(e.decode_s for e in self.passes)

    @property
    def throughput_tok_s(self) -> float:
        return sum(e.generated_tokens for e in self.passes) / (self.prefill_s + self.decode_s)

    @property
    def decode_tok_s(self) -> float:
        steps = sum(e.policy.batch_size * (e.workload.gen_len - 1) for e in self.passes)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def decode_layer(self) -> dict:
        return self.passes[0].decode_layer

    @property
    def memory(self):
        return self.passes[0].memory

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "throughput_tok_s": self.throughput_tok_s,
                "decode_tok_s": self.decode_tok_s, "passes": [e.to_dict() for e in self.passes]}


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
    if m.memory_phases:
        ph = Table(title="by phase (measured)", title_justify="left")
        for col in ("phase", "wall", "GPU allocated peak", "GPU process peak", "host RSS peak", "pinned"):
            ph.add_column(col, justify="left" if col == "phase" else "right")
        for d in m.memory_phases:
            ph.add_row(d["phase"], fmt_s(d.get("wall_s", 0.0)), fmt_bytes(d["gpu_allocated_peak_bytes"]),
                       fmt_bytes(d["gpu_process_peak_bytes"]), fmt_bytes(d["host_rss_peak_bytes"]),
                       fmt_bytes(d["pinned_bytes"]))
        con.print(ph)
