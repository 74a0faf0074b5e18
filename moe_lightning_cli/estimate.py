"""`moe-lightning estimate`: price one policy with the Hierarchical Roofline Model."""
from __future__ import annotations

from hrm.schedules import SCHEDULES

from .common import (COUNT, FRACTION, add_budget_args, add_target_args, build_target, budgets_of, check_outputs,
                     fmt_bytes, fmt_s, print_json, hardware_line, storage_line)


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="predict stage times, memory and throughput of one policy",
                       description="Predict per-layer stage times, memory peaks and throughput of one policy.")
    add_target_args(p)
    add_budget_args(p)
    g = p.add_argument_group("policy")
    g.add_argument("--batch-size", "-N", type=COUNT, default=504, help="sequences per pass (default 504)")
    g.add_argument("--micro-batch-size", "--mu", type=COUNT, default=36, help="sequences per micro-batch (default 36)")
    g.add_argument("--attention", choices=("cpu", "gpu"), default="cpu", help="where decode attention runs")
    g.add_argument("--ffn", choices=("gpu", "cpu"), default="gpu", help="where the routed experts run")
    g.add_argument("--weights-gpu-frac", type=FRACTION, default=0.0, help="fraction of expert weights resident on the GPU")
    g.add_argument("--kv-gpu-frac", type=FRACTION, default=0.0, help="fraction of the KV cache resident on the GPU")
    g.add_argument("--schedule", choices=tuple(SCHEDULES), default=None,
                   help="pipeline schedule (default: cgopipe with CPU attention, s4 with GPU attention)")
    g.add_argument("--datasheet", action="store_true",
                   help="set the profile's measurements aside: its unit-level rates with the efficiency model "
                        "(hrm/efficiency.py)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--plot", metavar="FILE.png", help="also write a figure of the breakdown")


def run(args) -> int:
    from hrm.estimate import RESOURCE_LABELS, estimate
    from hrm.policy import Policy

    check_outputs(args.plot)
    spec, hw, workload = build_target(args)
    budgets = budgets_of(args, hw)
    attention_on_gpu = args.attention == "gpu"
    schedule = args.schedule or ("s4" if attention_on_gpu else "cgopipe")
    policy = Policy(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                    attention_on_gpu=attention_on_gpu, ffn_on_gpu=args.ffn == "gpu",
                    weights_gpu_frac=args.weights_gpu_frac, kv_gpu_frac=args.kv_gpu_frac, schedule=schedule)
    est = estimate(spec, hw, workload, policy, use_measured=not args.datasheet)
    short = budgets.shortfalls(float(est.memory.gpu_bytes), float(est.memory.cpu_bytes))
    if args.plot:
        from viz.cli import plot_for_estimate
        plot_for_estimate(est, spec, hw, workload, args.plot)
    if args.json:
        print_json({**est.to_dict(), "budgets": budgets.to_dict(), "fits": not short, "does_not_fit": short,
                    "basis": hw.basis(not args.datasheet), "uncertainty": hw.uncertainty(not args.datasheet)})
        return 0
    _print(est, spec, hw, RESOURCE_LABELS, use_measured=not args.datasheet)
    _print_budgets(est, budgets, short)
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _print(est, spec, hw, labels, use_measured: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    wl, pol = est.workload, est.policy
    con.print(f"[bold]{spec.name}[/] on [bold]{hw.name}[/]  prompts avg {wl.avg_prompt_len:g} / max "
              f"{wl.max_prompt_len} ({'padded' if wl.padded else 'packed'}), generate {wl.gen_len}")
    if hardware_line(hw):
        con.print(hardware_line(hw), highlight=False)
    con.print(storage_line(spec), highlight=False)
    con.print(f"rates: {hw.basis(use_measured)}", highlight=False)
    uncertainty = hw.uncertainty_line(use_measured)
    if uncertainty:
        con.print(uncertainty, highlight=False)
    con.print(f"policy: {pol.short()}  ({pol.num_micro_batches} micro-batches, "
              f"{pol.resident_experts(spec.num_experts)}/{spec.num_experts} experts per layer on the GPU)")
    t = Table(title="decode, one layer at the mean context", title_justify="left")
    t.add_column("stage")
    t.add_column("time", justify="right")
    for k, v in est.decode_layer.items():
        label = f"  {k}" if k.startswith("h2d_") else k
        t.add_row(label + (" [bold red]<- binds[/]" if k == est.bound else ""), fmt_s(v))
    t.add_row("layer time", fmt_s(est.layer_time_s))
    t.add_row("step time (all layers + LM head)", fmt_s(est.step_time_s))
    con.print(t)
    m = Table(title="memory peaks", title_justify="left")
    m.add_column("level")
    m.add_column("total", justify="right")
    m.add_column("parts")
    for level, parts in est.memory.levels().items():
        total = sum(parts.values())
        m.add_row(level, fmt_bytes(total), ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items() if v > 0))
    con.print(m)
    r = Table(title="totals", title_justify="left")
    r.add_column("")
    r.add_column("", justify="right")
    r.add_row("prefill", fmt_s(est.prefill_s))
    r.add_row("decode", fmt_s(est.decode_s))
    r.add_row("throughput (end to end)", f"{est.throughput_tok_s:,.1f} tok/s")
    r.add_row("decode throughput", f"{est.decode_tok_s:,.1f} tok/s")
    r.add_row("binding resource", labels.get(est.bound, est.bound))
    con.print(r)


def _print_budgets(est, budgets, short) -> None:
    """The budgets plan holds a policy to, where they come from, and what does not fit them."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    m = Table(title="memory against the budgets plan uses", title_justify="left")
    for col, j in (("level", "left"), ("peak", "right"), ("budget", "right"), ("budget from", "left")):
        m.add_column(col, justify=j)
    m.add_row("GPU", fmt_bytes(est.memory.gpu_bytes), fmt_bytes(budgets.gpu_bytes), budgets.gpu_source)
    m.add_row("CPU (host)", fmt_bytes(est.memory.cpu_bytes), fmt_bytes(budgets.cpu_bytes), budgets.cpu_source)
    con.print(m)
    if not short:
        con.print("fits the budgets")
    for line in short:
        con.print(f"[bold red]does not fit:[/] {line}", highlight=False)
