"""`moe-lightning plan --replicas auto|K [--nodes M]`: replicas sharing a node, each planned on its share of
it (optimizer/replicas.py), and the whole job on M such nodes.

    replicas per node | one replica's plan (N, tok/s, bound) | the node's tok/s | the cluster's | the job's time

`auto` prices every divisor of the node's GPUs and two replicas per GPU, and takes the most node throughput;
K prices that count alone. The job (--num-prompts K, or --dataset) is split evenly over the cluster's
replicas, each running passes of its own plan: its time is the slowest replica's.
"""
from __future__ import annotations

import argparse
import math

from .common import COUNT, build_target, check_outputs, fmt_s, print_json


def replicas_arg(text: str):
    """`auto` or a count >= 1."""
    if text.strip().lower() == "auto":
        return "auto"
    return COUNT(text)


def add_replica_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas sharing a node (generate --replicas; docs/ray.md)")
    g.add_argument("--replicas", type=replicas_arg, default=None, metavar="auto|K",
                   help="plan K engine replicas per node, each on its share of the node (host memory, links, "
                        "cores and DRAM bandwidth divided among them); auto: the count with the most throughput")
    g.add_argument("--nodes", type=COUNT, default=1, metavar="M",
                   help="with --replicas: the cluster has M nodes like the profile's (default 1); the job's "
                        "time is priced on all of them")


def run_plan(args, plan) -> int:
    """`plan` is moe_lightning_cli.plan (its dataset reading, printing and job pricing), passed in by it."""
    from hrm.atomic import Outputs
    from hrm.spec import Workload
    from optimizer.replicas import candidate_counts, choose
    from optimizer.space import ALL_PLACEMENTS, SearchError

    check_outputs(args.output)
    if args.plot:
        raise SearchError("--plot does not apply with --replicas (plan one replica count without it)")
    if args.search_mode == "paper":
        raise SearchError("--replicas plans with our model: not with --search paper")
    spec, hw, workload = build_target(args)
    requests = lens = None
    if args.dataset:
        requests, lens = plan.dataset_prompts(args)
        workload = Workload.from_prompt_lens(lens, max(r.params.max_tokens for r in requests), padded=bool(args.padded))
    counts = candidate_counts(hw) if args.replicas == "auto" else [args.replicas]
    choice = choose(spec, hw, workload, counts, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                    gpu_frac=args.gpu_frac, cpu_frac=args.cpu_frac, solver=args.solver,
                    use_measured=not args.datasheet, placements=ALL_PLACEMENTS if args.cpu_experts else None)
    best = choice.best
    use_measured = not args.datasheet
    rows = [option_row(o, args.nodes, hw.gpu.count, requests, lens, args.num_prompts, use_measured,
                       plan.workload_job)
            for o in choice.options]
    chosen = next(r for r in rows if r["replicas_per_node"] == best.replicas_per_node)
    with Outputs() as out:
        if args.output:
            out.add_text(args.output, best.plan.to_json())
        out.commit()
    summary = {"mode": args.replicas if args.replicas == "auto" else "given", "nodes": args.nodes,
               "gpus_per_node": hw.gpu.count, "node": hw.name, "chosen": chosen, "options": rows}
    if args.json:
        print_json({**plan.to_json_dict(best.plan, [], args.output, use_measured=use_measured), "replicas": summary})
        return 0
    plan.print_plan(best.plan, [], use_measured=use_measured)
    print_options(summary)
    if args.output:
        print(f"wrote {args.output} (one replica's plan)")
    return 0


def option_row(option, nodes: int, gpus: int, requests, lens, num_prompts, use_measured: bool, workload_job) -> dict:
    """One replica count as the table and --json give it: the replica's plan, the node's and the cluster's
    throughput, and the whole job's time where a job is given."""
    k, plan = option.replicas_per_node, option.plan
    row = {"replicas_per_node": k, "replicas": k * nodes, "gpus_per_replica": gpus / k, "fits": plan is not None,
           "reason": option.reason or None, "batch_size": None, "replica_tok_s": None, "node_tok_s": None,
           "cluster_tok_s": None, "bound": None, "job": None}
    if plan is None:
        return row
    row.update(batch_size=plan.policy.batch_size, micro_batch_size=plan.policy.micro_batch_size,
               schedule=plan.policy.schedule, replica_tok_s=plan.throughput_tok_s, node_tok_s=option.node_tok_s,
               cluster_tok_s=option.node_tok_s * nodes, bound=plan.estimate.bound,
               host_budget_bytes=plan.budgets.cpu_bytes)
    job = cluster_job(plan, k * nodes, requests, lens, num_prompts, use_measured, workload_job)
    row["job"] = job
    return row


def cluster_job(plan, replicas: int, requests, lens, num_prompts, use_measured: bool, workload_job) -> dict | None:
    """The job split evenly (in order) over `replicas`, each pricing its share of passes under its own plan
    (moe_lightning.llm.predict_job / plan.workload_job); the job ends with the slowest share."""
    from moe_lightning.llm import predict_job
    if requests is not None:
        total = len(requests)
        bounds = [round(i * total / replicas) for i in range(replicas + 1)]
        shares = [predict_job(plan.spec, plan.hardware, plan.policy, requests[a:b], lens[a:b])
                  for a, b in zip(bounds, bounds[1:]) if b > a]
    elif num_prompts is not None:
        total = num_prompts
        per = math.ceil(total / replicas)
        shares = [workload_job(plan, per, use_measured=use_measured)]          # the largest share ends last
    else:
        return None
    slowest = max(shares, key=lambda j: j.seconds)
    return {"num_requests": total, "replicas": replicas, "prompts_per_replica": slowest.num_requests,
            "passes_per_replica": slowest.passes, "generated_tokens": sum(j.generated_tokens for j in shares)
            if requests is not None else total * plan.workload.gen_len, "seconds": slowest.seconds}


def print_options(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    n, g = summary["nodes"], summary["gpus_per_node"]
    t = Table(title=f"replicas per node on {summary['node']} ({g} GPU{'s' if g > 1 else ''} a node), "
                    f"cluster of {n} node{'s' if n > 1 else ''} (* chosen)", title_justify="left")
    for col in ("replicas/node", "GPUs each", "N", "bound", "tok/s each", "node tok/s", "cluster tok/s", "job"):
        t.add_column(col, justify="left" if col == "bound" else "right")
    best = summary["chosen"]["replicas_per_node"]
    for r in summary["options"]:
        mark = " *" if r["replicas_per_node"] == best else ""
        if not r["fits"]:
            t.add_row(f"{r['replicas_per_node']}{mark}", f"{r['gpus_per_replica']:g}", "-", "does not fit", "-", "-",
                      "-", "-")
            continue
        job = r["job"]
        t.add_row(f"{r['replicas_per_node']}{mark}", f"{r['gpus_per_replica']:g}", f"{r['batch_size']:,}", r["bound"],
                  f"{r['replica_tok_s']:,.1f}", f"{r['node_tok_s']:,.1f}", f"{r['cluster_tok_s']:,.1f}",
                  fmt_s(job["seconds"]) if job else "-")
    con.print(t)
    for r in summary["options"]:
        if not r["fits"]:
            con.print(f"  {r['replicas_per_node']} a node: {r['reason']}", highlight=False)
    c, job = summary["chosen"], summary["chosen"]["job"]
    con.print(f"best: {c['replicas_per_node']} replica{'s' if c['replicas_per_node'] > 1 else ''} a node, "
              f"{c['node_tok_s']:,.1f} tok/s a node, {c['cluster_tok_s']:,.1f} on {n} x {g} GPUs", highlight=False)
    if job:
        con.print(f"the whole job: {job['num_requests']:,} prompts on {job['replicas']} replicas "
                  f"({n} node{'s' if n > 1 else ''} x {c['replicas_per_node']}), at most {job['prompts_per_replica']:,} "
                  f"each in {job['passes_per_replica']} pass{'es' if job['passes_per_replica'] > 1 else ''}, "
                  f"predicted {fmt_s(job['seconds'])}", highlight=False)
    else:
        con.print("(--num-prompts K or --dataset prices a whole job on the cluster)", highlight=False)
