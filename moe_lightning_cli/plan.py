"""`moe-lightning plan`: search the best policy for a model, a machine and a workload.

With no arguments it plans the built-in default: Mixtral-8x7B on the paper's T4 host (t4-s1) for an
MTBench-like workload (prompts average 77 / longest 418 tokens, 128 generated). It prints the chosen
policy, the predicted throughput (end to end and decode), the binding resource, memory per level
against the budgets, and the baselines searched under the same budgets. numpy + pulp only: no torch.
"""
from __future__ import annotations

import sys

from .common import (COUNT, add_budget_args, add_target_args, build_target, check_outputs, fmt_s, print_json,
                     hardware_line, storage_line)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="search the best policy (the main job)",
                       description="Search the policy (N, mu, attention/expert placement, experts and KV on the "
                                   "GPU) with the highest predicted throughput, and compare it with baselines.")
    add_target_args(p)
    d = p.add_argument_group("workload from a dataset (replaces --prompt-len / --max-prompt-len)")
    d.add_argument("--dataset", metavar="REQUESTS.jsonl",
                   help="requests as `generate` takes them: the prompt lengths after tokenization (and each "
                        "request's max_tokens, default --gen-len) make the workload, and the whole job is priced")
    d.add_argument("--num-prompts", type=COUNT, default=None, metavar="K",
                   help="price a job of K prompts: the dataset's first K, or its lengths repeated (default: all); "
                        "without --dataset, K prompts of the --prompt-len / --gen-len workload")
    d.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory (default: the --model directory)")
    add_budget_args(p)
    s = p.add_argument_group("search")
    s.add_argument("--solver", choices=("grid", "milp"), default="grid",
                   help="vectorised grid search (fast, default) or MILP with pulp/CBC (slower)")
    s.add_argument("--search", choices=("default", "paper"), default="default", dest="search_mode",
                   help="default: our full model, end-to-end throughput; paper: the MoE-Lightning artifact's "
                        "model, mu grid and caps (reproduces its published policies)")
    s.add_argument("--datasheet", action="store_true",
                   help="set the profile's measurements aside: its unit-level rates with the efficiency model "
                        "(hrm/efficiency.py)")
    s.add_argument("--cpu-experts", action="store_true",
                   help="also search placements that compute routed experts on the CPU (priced by the model; "
                        "the runtime does not execute them)")
    s.add_argument("--no-baselines", action="store_true", help="skip the baseline comparison")
    from .plan_replicas import add_replica_args
    add_replica_args(p)
    p.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan to this file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--plot", metavar="FILE.png", help="also write a figure of the plan")


def run(args) -> int:
    """Plan; a request that cannot be met raises (main prints one line and exits 2). The plan file and the
    figure are replaced together, after both are made."""
    from hrm.atomic import Outputs
    from optimizer.search import make_problem, search
    from optimizer.space import SearchError
    from hrm.spec import Workload
    from optimizer.space import ALL_PLACEMENTS

    if args.replicas is not None:              # replicas sharing a node, and the cluster's job
        from .plan_replicas import run_plan
        return run_plan(args, sys.modules[__name__])
    check_outputs(args.output, args.plot)
    if args.search_mode == "paper" and (args.gpu_frac is not None or args.cpu_frac is not None):
        raise SearchError("--search paper holds plans to the artifact's own caps (0.86 of the GPU's, 0.8 of the "
                          "host's memory): --gpu-frac / --cpu-frac do not apply (--gpu-memory / --cpu-memory do)")
    spec, hw, workload = build_target(args)
    job = None
    if args.dataset:
        requests, lens = dataset_prompts(args)
        workload = Workload.from_prompt_lens(lens, max(r.params.max_tokens for r in requests), padded=bool(args.padded))

    def best(spec):       # the search this command runs, for the model as given or in another expert format
        return search(spec, hw, workload, solver=args.solver, mode=args.search_mode, gpu_memory=args.gpu_memory,
                      cpu_memory=args.cpu_memory, gpu_frac=args.gpu_frac, cpu_frac=args.cpu_frac,
                      use_measured=not args.datasheet, placements=ALL_PLACEMENTS if args.cpu_experts else None)

    plan = best(spec)
    if args.dataset:
        from moe_lightning.llm import predict_job
        job = predict_job(plan.spec, plan.hardware, plan.policy, requests, lens)
    elif args.num_prompts is not None:
        job = workload_job(plan, args.num_prompts, use_measured=not args.datasheet)
    formats = []
    if args.expert_dtype is not None:     # each format with its own best plan, beside the chosen one
        from hrm.formats import EXPERT_FORMATS
        formats = [format_row(name, plan if name == args.expert_dtype else best(spec.with_expert_format(name)))
                   for name in EXPERT_FORMATS]
    baselines = []
    if args.search_mode == "default" and not args.no_baselines:
        from optimizer.baselines import compare_baselines
        problem = make_problem(spec, hw, workload, budgets=plan.budgets, use_measured=not args.datasheet)
        baselines = compare_baselines(problem, solver="grid")
    with Outputs() as out:
        if args.output:
            out.add_text(args.output, plan.to_json())
        if args.plot:
            from viz import save_figure
            from viz.cli import plan_figure
            save_figure(plan_figure(plan, baselines=baselines or None, use_measured=not args.datasheet), args.plot,
                        outputs=out)
        out.commit()
    if args.json:
        print_json({**to_json_dict(plan, baselines, args.output, use_measured=not args.datasheet),
                    "job": job and job.to_dict(), **({"expert_formats": formats} if formats else {})})
        return 0
    print_plan(plan, baselines, use_measured=not args.datasheet)
    if formats:
        print_formats(formats, args.expert_dtype)
    if job is not None:
        print(f"the whole job: {job.num_requests:,} prompts in {job.passes:,} pass{'es' if job.passes > 1 else ''} of N <= "
              f"{plan.policy.batch_size:,}, {job.generated_tokens:,} tokens generated, predicted {fmt_s(job.seconds)}")
    if args.output:
        print(f"wrote {args.output}")
        if plan.hardware.gpu.count > 1:
            from hrm.parallel import unsupported
            n, why = plan.hardware.gpu.count, unsupported(plan.spec, plan.hardware.gpu.count)
            print(f"the runtime cannot run it on {n} GPUs (tensor parallelism does not support {'; '.join(why)}): "
                  "priced only" if why else f"run it on its {n} GPUs, one rank each: torchrun --standalone "
                  f"--nproc-per-node {n} -m moe_lightning_cli.main run --plan {args.output}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def format_row(name: str, plan) -> dict:
    """One expert format's best plan, as the formats table and --json give it."""
    pol = plan.policy
    return {"expert_dtype": name, "expert_bytes_per_weight": plan.spec.dtypes.expert_weight_bytes,
            "batch_size": pol.batch_size, "micro_batch_size": pol.micro_batch_size,
            "weights_gpu_frac": pol.weights_gpu_frac, "schedule": pol.schedule,
            "throughput_tok_s": plan.throughput_tok_s}


def print_formats(rows: list[dict], chosen: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    base = next(r["throughput_tok_s"] for r in rows if r["expert_dtype"] == "bf16")
    t = Table(title="expert formats, each with its own best plan (* this plan; int8 and int4 are round to "
                    "nearest: int4 loses quality on real models)", title_justify="left")
    for col in ("experts", "bytes / weight", "N", "mu", "r_w", "schedule", "tok/s", "vs bf16"):
        t.add_column(col, justify="left" if col in ("experts", "schedule") else "right")
    for r in rows:
        mark = " *" if r["expert_dtype"] == chosen else ""
        t.add_row(r["expert_dtype"] + mark, f"{r['expert_bytes_per_weight']:.3f}", f"{r['batch_size']:,}",
                  f"{r['micro_batch_size']:,}", f"{r['weights_gpu_frac']:.3f}", r["schedule"],
                  f"{r['throughput_tok_s']:,.1f}", f"{r['throughput_tok_s'] / base:.2f}x")
    (console or Console()).print(t)


def workload_job(plan, k: int, *, use_measured: bool = True):
    """K prompts of the plan's workload: full passes of the plan's N, each the plan's predicted pass, and
    a last pass of the K mod N left, priced at its own size."""
    from hrm.estimate import estimate
    from moe_lightning.llm import JobPrediction

    n = plan.policy.batch_size
    full, rest = divmod(k, n)
    seconds = full * plan.estimate.total_s
    if rest:
        last = plan.policy.for_batch(rest)
        seconds += estimate(plan.spec, plan.hardware, plan.workload, last, use_measured=use_measured).total_s
    return JobPrediction(k, full + (rest > 0), k * plan.workload.gen_len, seconds)


def dataset_prompts(args):
    """(requests, prompt lengths) of --dataset after tokenization, cut or repeated to --num-prompts."""
    from dataclasses import replace
    from pathlib import Path

    from moe_lightning.hub import resolve_model
    from moe_lightning.requests import RequestError, SamplingParams, read_requests
    from moe_lightning.text import TextCodec

    requests = read_requests(args.dataset, SamplingParams(max_tokens=int(args.gen_len)))
    k = len(requests) if args.num_prompts is None else args.num_prompts
    if k < 1:
        raise RequestError(f"--num-prompts must be >= 1, got {k}")
    tok_dir = args.tokenizer or resolve_model(args.model, download=args.download)
    if not Path(tok_dir).is_dir():
        raise RequestError(f"--dataset needs a tokenizer: give --tokenizer DIR or a --model directory "
                           f"(not {tok_dir!r})")
    codec = TextCodec.from_model_dir(tok_dir)
    lens = [len(codec.encode(r)) for r in requests]
    order = [i % len(requests) for i in range(k)]
    return ([replace(requests[i], id=f"{requests[i].id}#{n // len(requests)}") for n, i in enumerate(order)],
            [lens[i] for i in order])


def to_json_dict(plan, baselines, output=None, use_measured: bool = True) -> dict:
    ours = plan.throughput_tok_s
    return {"plan": plan.to_dict(), "output": output, "basis": plan.hardware.basis(use_measured),
            "uncertainty": plan.hardware.uncertainty(use_measured),
            "baselines": [b.to_dict(ours_tok_s=ours) for b in baselines]}


# ---------------------------------------------------------------------------------------------------
# tables

def _on(flag: bool) -> str:
    return "GPU" if flag else "CPU"


def print_plan(plan, baselines, console=None, use_measured: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    from hrm.estimate import RESOURCE_LABELS
    from hrm.units import format_size

    con = console or Console()
    spec, wl, pol, est = plan.spec, plan.workload, plan.policy, plan.estimate
    E = spec.num_experts
    e = pol.resident_experts(E)
    con.print(f"[bold]{spec.name}[/] on [bold]{plan.hardware.name}[/]: prompts avg {wl.avg_prompt_len:g} / max "
              f"{wl.max_prompt_len} ({'padded' if wl.padded else 'packed'}), generate {wl.gen_len}")
    if hardware_line(plan.hardware):
        con.print(hardware_line(plan.hardware), highlight=False)
    con.print(storage_line(spec), highlight=False)
    con.print(f"rates: {plan.hardware.basis(use_measured)}", highlight=False)
    uncertainty = plan.hardware.uncertainty_line(use_measured)
    if uncertainty:
        con.print(uncertainty, highlight=False)
    con.print(f"search: {plan.mode} mode, {plan.solver} solver, {plan.search_time_s:.2f} s")

    t = Table(title="chosen policy", title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("batch size N", f"{pol.batch_size:,}")
    t.add_row("micro-batch size mu", f"{pol.micro_batch_size:,} ({pol.num_micro_batches} micro-batches)")
    t.add_row("attention on", _on(pol.attention_on_gpu))
    t.add_row("routed experts computed on", _on(pol.ffn_on_gpu))
    t.add_row("experts resident on the GPU", f"{e}/{E} per MoE layer (r_w = {e / E:.3f})")
    t.add_row("KV cache on the GPU", f"{pol.kv_gpu_frac:.1%}")
    t.add_row("schedule", pol.schedule)
    con.print(t)

    r = Table(title="prediction", title_justify="left", show_header=False)
    r.add_column("")
    r.add_column("", justify="right")
    r.add_row("throughput (end to end)", f"[bold]{est.throughput_tok_s:,.1f} tok/s[/]")
    r.add_row("decode throughput", f"{est.decode_tok_s:,.1f} tok/s" if est.decode_tok_s == est.decode_tok_s
              else "- (one generated token: no decode step)")
    r.add_row("prefill / decode time", f"{fmt_s(est.prefill_s)} / {fmt_s(est.decode_s)}")
    r.add_row("binding resource (decode)", RESOURCE_LABELS.get(est.bound, est.bound))
    if plan.paper is not None:
        pp = plan.paper
        r.add_row("artifact model: decode throughput", f"{pp.decode_tok_s:,.1f} tok/s (T = {fmt_s(pp.layer_time_s)}/layer, "
                                                       f"bound {pp.bound}, r_w LP = {pp.weights_gpu_frac:.4f})")
    con.print(r)

    m = Table(title="memory per level", title_justify="left")
    for col, j in (("level", "left"), ("used", "right"), ("budget", "right"), ("share", "right"), ("budget from", "left")):
        m.add_column(col, justify=j)
    mem, b = plan.memory, plan.budgets
    m.add_row("GPU", format_size(mem.gpu_bytes), format_size(mem.gpu_budget_bytes),
              f"{mem.gpu_bytes / mem.gpu_budget_bytes:.1%}", b.gpu_source)
    m.add_row("CPU", format_size(mem.cpu_bytes), format_size(mem.cpu_budget_bytes),
              f"{mem.cpu_bytes / mem.cpu_budget_bytes:.1%}", b.cpu_source)
    m.add_row("  of which pinned", format_size(mem.pinned_bytes), "", "", "")
    con.print(m)

    if baselines:
        ours = est.throughput_tok_s
        c = Table(title="baselines (same model and budgets, each at its own best N and mu)", title_justify="left")
        for col, j in (("system", "left"), ("N/mu", "right"), ("attn", "left"), ("GPU experts", "right"),
                       ("schedule", "left"), ("tok/s", "right"), ("ours is", "right")):
            c.add_column(col, justify=j, no_wrap=col in ("system", "tok/s"))

        def row(label, policy, tput, speedup):
            c.add_row(label, f"{policy.batch_size}/{policy.micro_batch_size}", _on(policy.attention_on_gpu),
                      f"{policy.resident_experts(E)}/{E}", policy.schedule, f"{tput:,.1f}", speedup)

        row("[bold]ours[/]", pol, ours, "")
        notes = []
        for res in baselines:
            if res.estimate is None:
                c.add_row(res.baseline.label, "-", "-", "-", "-", "-", "-")
                notes.append(f"{res.baseline.label}: {res.reason}")
            else:
                row(res.baseline.label, res.policy, res.throughput_tok_s, f"{ours / res.throughput_tok_s:,.2f}x")
        con.print(c)
        for note in notes:
            con.print(f"  {note}")


def main(argv=None) -> int:
    """Run `plan` on its own: python -m moe_lightning_cli.plan [args]."""
    from .main import main as cli
    return cli(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
