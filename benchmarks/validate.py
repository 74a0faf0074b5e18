"""Predicted vs measured: run a sweep of policies through the runtime and compare with the HRM.

For one model, one machine profile and one GPU budget, it searches the optimizer's plan and each
baseline's best policy, adds policies spanning N, mu, weights_gpu_frac and attention placement, runs each
through `runtime.Engine` with synthetic weights, and writes one CSV row per policy (predicted and
measured end-to-end, decode, prefill, per-stage seconds per layer-step) plus a JSON sidecar with the
machine, command and date, and a predicted-vs-measured PNG.

Models too large for the host run with fewer layers (`--num-layers`): the GPU budget given for the full
model is then scaled by layers / full layers for the part that grows with layers, while what does not
(embeddings, LM head and the double buffer of one layer's experts) is kept whole:
    budget_L = fixed + (budget_full - fixed) * L / L_full.
The host-memory budget (offloaded experts and KV cache, both per layer) is scaled by L / L_full.

    PYTHONPATH=. python benchmarks/validate.py --hardware h200 --num-layers 8 --gpu-budget 24GB \
        --prompt-len 256 --gen-len 32 --out $OUT/validation_24gb.csv
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hrm.atomic import atomic_write, atomic_write_text  # noqa: E402
from hrm.estimate import estimate  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Policy, PolicyError  # noqa: E402
from hrm.spec import ModelSpec, Workload  # noqa: E402
from optimizer.baselines import compare_baselines  # noqa: E402
from optimizer.search import make_problem, search  # noqa: E402
from optimizer.space import DEFAULT_CPU_FRAC, DEFAULT_PLACEMENTS, Budgets  # noqa: E402
from hrm.units import parse_size  # noqa: E402

STAGE_MAP = {  # predicted decode_layer key -> measured stage name
    "gpu": "gpu_compute", "cpu": "cpu_attention", "h2d_weights": "h2d_weights", "h2d_act": "h2d_hidden",
    "h2d_kv": "h2d_kv", "d2h": "d2h",
}


def scaled_budget(spec: ModelSpec, full_layers: int, budget_full: float) -> float:
    """GPU budget for a model cut to spec.num_hidden_layers layers (see the module docstring)."""
    wb = spec.dtypes.weight_bytes
    embeddings = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2) * wb
    fixed = embeddings + 2 * spec.num_experts * spec.expert_bytes
    return fixed + (budget_full - fixed) * spec.num_hidden_layers / full_layers


def sweep_policies(chosen: Policy, baselines, spec: ModelSpec, fits) -> list[tuple[str, Policy]]:
    """The chosen plan, each baseline's best, and variations of N, mu, r_w and attention placement."""
    E = spec.num_experts
    out = [("chosen", chosen)]
    for b in baselines:
        if b.policy is not None and b.policy not in {p for _, p in out}:
            out.append((f"baseline:{b.baseline.key}", b.policy))
    N, mu = chosen.batch_size, chosen.micro_batch_size
    cands = []
    e0 = chosen.resident_experts(E)
    for e in sorted({0, e0 + 1, e0 + 2, E // 2}):
        if 0 <= e <= E and e != e0:
            half = max(1, N // 2)
            cands.append(("r_w", replace(chosen, weights_gpu_frac=e / E, batch_size=half,
                                         micro_batch_size=min(mu, half))))
    cands.append(("one micro-batch", replace(chosen, micro_batch_size=N)))
    cpu_attn = dict(attention_on_gpu=False, kv_gpu_frac=0.0)
    cands.append(("cpu attention", _policy(chosen, schedule="cgopipe", **cpu_attn)))
    cands.append(("s3", _policy(chosen, schedule="s3", **cpu_attn)))
    cands.append(("gpu attention s4", _policy(chosen, attention_on_gpu=True, schedule="s4",
                                              batch_size=max(1, N // 4), micro_batch_size=max(1, min(mu, N // 4)))))
    # N at 1/4, 1/2 and 1 of the chosen, each with 1, 4 and 16 micro-batches (the fixed cost per
    # micro-batch visit shows only across micro-batch counts)
    for n_frac in (1.0, 0.5, 0.25):
        n = max(1, int(N * n_frac))
        for count in (16, 4, 1):
            cands.append(("grid", replace(chosen, batch_size=n, micro_batch_size=max(1, -(-n // count)))))
    seen = {p for _, p in out}
    for tag, p in cands:
        if p is not None and p not in seen and fits(p):
            out.append((tag, p))
            seen.add(p)
    return out


def _policy(base: Policy, **changes) -> Policy | None:
    try:
        return replace(base, **changes)
    except PolicyError:
        return None


def ideal_profile(hw):
    """The HRM's ideal bound: the measured ceilings without the runtime's fixed per-visit costs."""
    if hw.measured is None:
        return hw
    return replace(hw, measured=replace(hw.measured, decode_visit_s=0.0, decode_visit_s_by_schedule=(),
                                        decode_visit_s_grouped_by_schedule=(), cpu_attention_call_s=0.0))


def predicted_columns(spec, hw, workload, p: Policy) -> dict:
    """The HRM's prediction of one policy, as CSV columns (pred_*, ideal_decode_tok_s)."""
    est = estimate(spec, hw, workload, p)
    ideal = estimate(spec, ideal_profile(hw), workload, p)
    row = {"pred_tok_s": est.throughput_tok_s, "pred_decode_tok_s": est.decode_tok_s,
           "pred_prefill_s": est.prefill_s, "pred_decode_s": est.decode_s, "pred_bound": est.bound,
           "pred_gpu_bytes": est.memory.gpu_bytes, "ideal_decode_tok_s": ideal.decode_tok_s}
    row.update({f"pred_layer_{k}_s": v for k, v in est.decode_layer.items()})
    row["pred_visit_s"] = est.decode_layer["launch"] / p.num_micro_batches
    return row


def error_columns(row: dict) -> dict:
    """Relative errors (predicted - measured) / measured and the pipeline efficiency of a measured row."""
    return {"err_tok_s": (row["pred_tok_s"] - row["meas_tok_s"]) / row["meas_tok_s"],
            "err_decode_tok_s": (row["pred_decode_tok_s"] - row["meas_decode_tok_s"]) / row["meas_decode_tok_s"],
            "err_prefill_s": (row["pred_prefill_s"] - row["meas_prefill_s"]) / row["meas_prefill_s"],
            "pipeline_efficiency": row["meas_decode_tok_s"] / row["ideal_decode_tok_s"]}


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write(f):
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    atomic_write(path, write)


def run_one(spec, policy, workload, budget_bytes, seed: int, cuda_graphs: bool = False):
    """Measure one policy with synthetic weights: (Measurement, recorded spans)."""
    import torch
    from runtime.engine import Engine

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, spec.vocab_size - 10, (policy.batch_size, workload.max_prompt_len), generator=g).tolist()
    with Engine(spec, policy, gpu_memory_budget_bytes=int(budget_bytes), seed=seed, progress=False,
                cuda_graphs=cuda_graphs) as eng:
        # H200: a policy's first run in a process measured 9% below its second; the host KV cache and staging
        # are allocated once, as the weights are (setup_s is the measured pass's per-pass layout)
        eng.warm_up(prompts, workload.gen_len)
        _, m = eng.generate(prompts, workload.gen_len)
        spans = eng.last_spans
    del eng
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return m, spans


def _timeline(spans, title: str, path: Path) -> None:
    try:
        from viz import save_figure, timeline_figure
        save_figure(timeline_figure(spans, title=title), path)
    except Exception as e:  # the figure is a convenience; the CSV is the result
        print(f"timeline skipped: {e}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--num-layers", type=int, default=None, help="run the model cut to this many layers")
    ap.add_argument("--hardware", default="h200", help="profile name or .toml (use the measured one)")
    ap.add_argument("--gpu-budget", default="24GB", help="GPU budget for the full model, e.g. 24GB")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--max-policies", type=int, default=16)
    ap.add_argument("--skip", type=int, default=0,
                    help="run the sweep from this policy on (to finish a sweep that hit its time limit)")
    ap.add_argument("--time-limit-s", type=float, default=500, help="start no new policy after this")
    ap.add_argument("--out", required=True, help="CSV path; a .json sidecar and a .png are written beside it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda-graphs", action="store_true", help="run every policy with decode PostAttn graphs")
    ap.add_argument("--dry-run", action="store_true", help="list the policies with their predictions, run nothing")
    return ap


def sweep_setting(args):
    """(full model spec, spec as run, workload) of a validate.py command line."""
    full = load_model(args.model)
    spec = full.with_layers(args.num_layers) if args.num_layers else full
    return full, spec, Workload.uniform(args.prompt_len, args.gen_len)


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    t_start = time.perf_counter()
    full, spec, workload = sweep_setting(args)
    hw = load_profile(args.hardware)
    budget_full = parse_size(args.gpu_budget)
    budget = scaled_budget(spec, full.num_hidden_layers, budget_full) if args.num_layers else budget_full
    # host memory holds per-layer things only (offloaded experts, KV cache): it scales with the layers
    cpu_budget = hw.cpu.memory_bytes * DEFAULT_CPU_FRAC * spec.num_hidden_layers / full.num_hidden_layers
    budgets = Budgets.from_hardware(hw, gpu_memory=budget, cpu_memory=cpu_budget)
    plan = search(spec, hw, workload, budgets=budgets, placements=DEFAULT_PLACEMENTS)
    problem = make_problem(spec, hw, workload, budgets=budgets)
    baselines = compare_baselines(problem)
    if args.dry_run:
        for b in baselines:
            print(f"baseline {b.baseline.key}: {b.policy.short() if b.policy else b.reason}")

    def fits(p: Policy) -> bool:
        e = estimate(spec, hw, workload, p)
        return e.memory.gpu_bytes <= problem.budgets.gpu_bytes and e.memory.cpu_bytes <= problem.budgets.cpu_bytes

    policies = sweep_policies(plan.policy, baselines, spec, fits)[: args.max_policies]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["python", "benchmarks/validate.py"] + list(sys.argv[1:] if argv is None else argv)), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": platform.node(), "hardware_profile": hw.path or hw.name, "model": spec.name,
        "full_model_layers": full.num_hidden_layers, "gpu_budget_full_model_bytes": budget_full,
        "gpu_budget_bytes": budget, "cpu_budget_bytes": problem.budgets.cpu_bytes,
        "workload": workload.__dict__, "chosen_policy": plan.policy.__dict__, "cuda_graphs": args.cuda_graphs,
        "baselines": [b.to_dict(plan.throughput_tok_s) for b in baselines],
    }
    try:
        import torch
        meta["torch"] = torch.__version__
        meta["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    print(f"{spec.name}: budget {budget / 1e9:.2f} GB (full-model {budget_full / 1e9:.0f} GB); "
          f"chosen {plan.policy.short()} predicted {plan.throughput_tok_s:.1f} tok/s; {len(policies)} policies", flush=True)
    rows = []
    if args.dry_run:
        for tag, p in policies:
            e = estimate(spec, hw, workload, p)
            print(f"{tag:18s} {p.short():58s} pred {e.throughput_tok_s:8.1f} tok/s bound {e.bound} "
                  f"gpu {e.memory.gpu_bytes / 1e9:.1f} GB")
        return 0
    for i, (tag, p) in enumerate(policies):
        if i < args.skip:
            continue
        if time.perf_counter() - t_start > args.time_limit_s:
            print(f"time limit reached; {len(policies) - i} policies not run", flush=True)
            break
        row = {"tag": tag, "policy": p.short(), **{f"policy_{k}": v for k, v in p.__dict__.items()},
               **predicted_columns(spec, hw, workload, p)}
        t0 = time.perf_counter()
        try:
            m, spans = run_one(spec, p, workload, budget, args.seed + i, cuda_graphs=args.cuda_graphs)
            if tag == "chosen":
                _timeline(spans, f"{spec.name}, {m.device}: {p.short()}", out.with_name(out.stem + "_timeline.png"))
        except Exception as e:  # a policy that fails is recorded, not hidden
            row.update({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
            print(f"[{i + 1}/{len(policies)}] {tag:18s} {p.short():58s} FAILED {row['error']}", flush=True)
            rows.append(row)
            write_csv(out, rows)
            continue
        row.update({"meas_tok_s": m.tokens_per_s, "meas_decode_tok_s": m.decode_tokens_per_s,
                    "meas_prefill_s": m.prefill_s, "meas_decode_s": m.decode_s, "meas_setup_s": m.setup_s,
                    "meas_gpu_peak_bytes": m.gpu_peak_bytes,
                    "meas_pinned_bytes": m.pinned_bytes, "wall_s": time.perf_counter() - t0})
        row.update({f"meas_layer_{k}_s": m.per_layer_step_s(v) for k, v in STAGE_MAP.items()})
        row.update(error_columns(row))
        # decode seconds per (micro-batch, layer) visit, against the profile's fixed host cost per visit
        row["meas_visit_s"] = m.decode_s / max(1, m.decode_layer_steps * p.num_micro_batches)
        rows.append(row)
        write_csv(out, rows)
        print(f"[{i + 1}/{len(policies)}] {tag:18s} {p.short():58s} pred {row['pred_tok_s']:8.1f} "
              f"meas {m.tokens_per_s:8.1f} tok/s ({row['err_tok_s']:+.1%}) prefill {m.prefill_s:.2f}s "
              f"decode {m.decode_s:.2f}s gpu peak {m.gpu_peak_bytes / 1e9:.1f} GB", flush=True)
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["policies_skipped"] = args.skip
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2, default=str))
    done = [r for r in rows if "meas_tok_s" in r]
    if done:
        import numpy as np
        errs = np.abs([r["err_tok_s"] for r in done])
        print(f"median |error| {np.median(errs):.1%}, max {errs.max():.1%} over {len(done)} policies")
        try:
            import pandas as pd
            from viz import predicted_vs_measured_figure, save_figure
            df = pd.DataFrame({"predicted_tok_s": [r["pred_tok_s"] for r in done],
                               "measured_tok_s": [r["meas_tok_s"] for r in done],
                               "policy": [f"{r['tag']}: {r['policy']}" for r in done]})
            save_figure(predicted_vs_measured_figure(df), out.with_suffix(".png"))
        except Exception as e:  # the plot is a convenience; the CSV is the result
            print(f"plot skipped: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
