"""`moe-lightning generate`: run a JSONL file of requests through a model, write a JSONL of completions.

    moe-lightning generate --model DIR|HUB_ID -i requests.jsonl -o completions.jsonl

Each input line is {"id", "prompt"} or {"id", "messages"} (the model's chat template), optionally with
max_tokens, temperature, top_p and stop. Each output line is {"id", "text", "token_ids", "finish_reason",
"prompt_tokens", "completion_tokens"}. Without --plan the job is planned for this machine from its own
prompt lengths. The output grows one finished engine pass at a time (the file replaced atomically), and
ids already in it are skipped: run the same command again to resume.
"""
from __future__ import annotations

import sys
import time

from .common import COUNT, SHARE, add_expert_dtype_arg, add_kv_dtype_arg, fmt_s, size, value


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="batch inference: JSONL requests in, JSONL completions out",
                       description="Generate text for every request of a JSONL file with the CGOPipe runtime, "
                                   "under a plan for this machine; resumable.")
    p.add_argument("--model", required=True, metavar="DIR|HUB_ID",
                   help="checkpoint directory (config.json, safetensors, tokenizer) or a Hub id in the local "
                        "Hugging Face cache")
    p.add_argument("-i", "--input", required=True, metavar="REQUESTS.jsonl", help="one request per line")
    p.add_argument("-o", "--output", required=True, metavar="COMPLETIONS.jsonl",
                   help="appended per finished pass; ids already in it are skipped")
    d = p.add_argument_group("request defaults (a request's own fields win)")
    d.add_argument("--max-tokens", type=COUNT, default=128, help="new tokens at most (default 128)")
    d.add_argument("--temperature", type=value(float, positive=False), default=0.0, help="0: greedy (default)")
    d.add_argument("--top-p", type=SHARE, default=1.0)
    d.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    x = p.add_argument_group("plan and execution")
    x.add_argument("--plan", metavar="PLAN.json", help="run this plan (default: plan for this machine and job)")
    x.add_argument("--hardware", help="profile to plan with (default: this GPU's built-in profile)")
    x.add_argument("--gpu-memory", metavar="SIZE", type=size, default=None, help="GPU memory to plan for (e.g. 24GiB)")
    x.add_argument("--cpu-memory", metavar="SIZE", type=size, default=None, help="host memory to plan for (e.g. 100GB)")
    x.add_argument("--batch-size", type=COUNT, default=None,
                   help="at most this many requests per engine pass (default: the plan's N)")
    x.add_argument("--dtype", default=None, help="weight/activation dtype (default: the model's)")
    add_expert_dtype_arg(x)
    add_kv_dtype_arg(x)
    x.add_argument("--seed", type=value(int, positive=False), default=0, help="sampling seed")
    x.add_argument("--download", action="store_true", help="fetch a Hub id that is not in the local cache")
    r = p.add_argument_group("scale out on Ray (pip install 'moe-lightning[ray]'; docs/ray.md)")
    r.add_argument("--replicas", type=COUNT, default=None, metavar="K",
                   help="run K engine replicas as Ray actors, each with its own plan for its share of its node "
                        "(default with --ray-address: one a node); the output is written once, in input order")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (e.g. auto, or ray://head:10001); default: a local one")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


def run(args) -> int:
    from moe_lightning import LLM
    from moe_lightning.outputs import append_completions, read_completions
    from moe_lightning.requests import SamplingParams, read_requests

    defaults = SamplingParams(args.max_tokens, args.temperature, args.top_p, tuple(args.stop))
    requests = read_requests(args.input, defaults)
    done = read_completions(args.output)
    todo = [r for r in requests if r.id not in done]
    say = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    if not todo:
        say(f"all {len(requests)} requests already in {args.output}")
        return 0
    if args.replicas is not None or args.ray_address:
        return _run_on_ray(args, requests, done, todo, say)
    llm = LLM(args.model, plan=args.plan, hardware=args.hardware, gpu_memory=args.gpu_memory,
              cpu_memory=args.cpu_memory, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
              download=args.download, progress=not args.quiet, expert_dtype=args.expert_dtype,
              kv_dtype=args.kv_dtype)
    bar = _Progress(say, quiet=args.quiet)

    def on_start(batches, predicted_s):
        pol = llm.policy
        say(f"plan ({llm.plan_source}): {llm.plan.hardware.name}, N={pol.batch_size} mu={pol.micro_batch_size}; "
            f"{len(todo)} of {len(requests)} requests to run ({len(done)} already in {args.output}) in "
            f"{len(batches)} passes, predicted {fmt_s(sum(predicted_s))}")
        bar.start(len(todo), predicted_s)

    def on_batch(completions):
        append_completions(args.output, completions)
        bar.advance(len(completions), sum(c.completion_tokens for c in completions))

    t0 = time.perf_counter()
    try:
        with llm:
            llm.run(requests, skip=done, on_batch=on_batch, on_start=on_start)
    finally:
        bar.stop()
    say(f"wrote {len(todo)} completions to {args.output} in {fmt_s(time.perf_counter() - t0)}")
    return 0


def _run_on_ray(args, requests, done, todo, say) -> int:
    """The job on Ray (moe_lightning.ray_generate): every completion back, then one write in input order."""
    from moe_lightning import LLM
    from moe_lightning.outputs import append_completions
    from moe_lightning.ray_generate import import_ray, run_replicas

    import_ray()
    llm = LLM(args.model, plan=args.plan, hardware=args.hardware, gpu_memory=args.gpu_memory,
              cpu_memory=args.cpu_memory, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
              download=args.download, progress=False, expert_dtype=args.expert_dtype, kv_dtype=args.kv_dtype)
    config = {"model": args.model, "plan": llm.plan, "hardware": args.hardware, "gpu_memory": args.gpu_memory,
              "cpu_memory": args.cpu_memory, "batch_size": args.batch_size, "dtype": args.dtype, "seed": args.seed,
              "expert_dtype": args.expert_dtype, "kv_dtype": args.kv_dtype, "download": args.download}
    t0 = time.perf_counter()
    got = run_replicas(llm, requests, skip=done, replicas=args.replicas, address=args.ray_address, config=config,
                       say=say)
    append_completions(args.output, [got[i][0] for i in sorted(got)])
    plans = sorted(set(p for _, p in got.values()))
    say(f"wrote {len(todo)} completions to {args.output} in {fmt_s(time.perf_counter() - t0)} "
        f"({len(plans)} replica{'s' if len(plans) > 1 else ''} answered: {', '.join(plans)})")
    return 0


class _Progress:
    """A bar over requests; the time left is the plan's prediction for the passes left, scaled by how the
    finished passes measured against their prediction."""

    def __init__(self, say, quiet: bool):
        self.quiet, self.progress, self.task = quiet, None, None

    def start(self, total: int, predicted_s: list[float]) -> None:
        self.predicted, self.passes, self.t0 = list(predicted_s), 0, time.perf_counter()
        if self.quiet:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.progress = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
                                 TimeElapsedColumn(), TextColumn("{task.fields[left]}"),
                                 console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("generate", total=total, left=f"~{fmt_s(sum(self.predicted))} left (plan)")

    def advance(self, requests: int, tokens: int) -> None:
        self.passes += 1
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.t0
        spent = sum(self.predicted[:self.passes])
        scale = elapsed / spent if spent > 0 else 1.0
        left = sum(self.predicted[self.passes:]) * scale
        self.progress.update(self.task, advance=requests, left=f"~{fmt_s(left)} left")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
