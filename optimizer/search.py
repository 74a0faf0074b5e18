"""`search(...) -> Plan`: the best policy for a model, a machine and a workload.

Default mode maximises end-to-end throughput, N * gen_len / (prefill + decode), under our full model
(hrm.estimate). The outer search enumerates (placement, N, mu); the inner choice (resident experts e and
KV fraction r_c) is made per (N, mu) by either solver over the same hrm equations:
- solver="grid": vectorised numpy over all pairs at once (optimizer/grid.py);
- solver="milp": a pulp MILP with e integer and r_c continuous, many pairs per CBC call (optimizer/milp.py).

(N, mu) enumeration (`Resolution`): stage 1 takes every mu up to a dense limit and then geometric steps,
and for each mu the multiples N = k * mu on the same kind of grid plus the largest N that fits; stage 2
scans a box around the best points with integer steps that shrink to 1. Or pass `pairs=Pairs(...)` for
an explicit, exhaustive set (tests, what-ifs). mode="paper" runs the artifact's own model and search
(optimizer/paper.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hrm.estimate import memory_use
from hrm.policy import Policy
from hrm.hardware import HardwareProfile
from hrm.spec import ModelSpec, Workload
from . import grid, paper
from .plan import build_plan, plan_from_found
from .space import (runtime_placements, GRID_RESOLUTION, MILP_RESOLUTION,
                    Budgets, Pairs, PlacementOption, Problem, Resolution, SearchError, format_size, int_grid,
                    neighbours, span)

SOLVERS = ("grid", "milp")
MODES = ("default", "paper")


@dataclass(frozen=True)
class Found:
    """The best point one search found: a placement, (N, mu) and the inner choice."""
    placement: PlacementOption
    batch_size: int
    micro_batch_size: int
    experts: int
    kv_gpu_frac: float
    total_s: float
    throughput_tok_s: float
    pairs_evaluated: int


def _inner(solver: str):
    if solver == "grid":
        return grid.best_per_pair
    if solver == "milp":
        from . import milp
        return milp.best_per_pair
    raise SearchError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


# ---------------------------------------------------------------------------------------------------
# memory limits of N and mu

def _batch_ceiling(problem: Problem, placement: PlacementOption) -> int:
    """An N that certainly does not fit: the bytes every extra sequence adds on both levels together."""
    s = problem.setting(placement)
    one, two = (memory_use(s, n, 1, 1.0, 0.0) for n in (1, 2))
    per_seq = float((two.gpu_bytes + two.cpu_bytes) - (one.gpu_bytes + one.cpu_bytes))
    total = problem.budgets.gpu_bytes + problem.budgets.cpu_bytes
    return int(total / max(per_seq, 1.0)) + 2


def _largest_feasible(problem: Problem, placement: PlacementOption, lo: np.ndarray, hi: np.ndarray, fn) -> np.ndarray:
    """Per entry, the largest x in [lo, hi) with fn(x) feasible, given fn(lo) feasible and fn(hi) not."""
    lo, hi = lo.astype(np.int64).copy(), hi.astype(np.int64).copy()
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        ok = fn(mid)
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return lo


def micro_batch_cap(problem: Problem, placement: PlacementOption) -> int:
    """The largest mu with (N = mu, mu) feasible (0 when not even one sequence fits)."""
    if not grid.feasible(problem, placement, [1], [1])[0]:
        return 0
    top = np.array([_batch_ceiling(problem, placement)])
    return int(_largest_feasible(problem, placement, np.array([1]), top,
                                 lambda m: grid.feasible(problem, placement, m, m))[0])


def batch_caps(problem: Problem, placement: PlacementOption, mus: np.ndarray) -> np.ndarray:
    """For each mu (each feasible with N = mu), the largest feasible N."""
    top = np.full(len(mus), _batch_ceiling(problem, placement))
    return _largest_feasible(problem, placement, mus, top, lambda n: grid.feasible(problem, placement, n, mus))


# ---------------------------------------------------------------------------------------------------
# the outer search

def _stage1_pairs(problem: Problem, placement: PlacementOption, res: Resolution):
    mu_cap = micro_batch_cap(problem, placement)
    if mu_cap == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    mus = int_grid(mu_cap, res.dense, res.ratio)
    if placement.one_micro_batch:
        return mus, mus
    caps = batch_caps(problem, placement, mus)
    Ns, Ms = [], []
    for mu, cap in zip(mus, caps):
        ks = int_grid(cap // mu, res.dense, res.ratio)
        n = np.unique(np.append(ks * mu, cap))
        Ns.append(n)
        Ms.append(np.full(len(n), mu))
    return np.concatenate(Ns), np.concatenate(Ms)


def _best_of(problem: Problem, choice: grid.Choice, top: int) -> list[int]:
    """Indices of the `top` feasible pairs with the highest throughput."""
    tput = choice.throughput(problem.workload.gen_len)
    order = np.argsort(-tput, kind="stable")
    return [int(i) for i in order[:top] if np.isfinite(tput[i])]


def _refine(problem: Problem, placement: PlacementOption, inner, res: Resolution, N0: int, mu0: int,
            mu_grid: np.ndarray, n_grid: np.ndarray):
    """Scan a shrinking box of integer (N, mu) around (N0, mu0); returns (Choice of the best, pairs seen)."""
    mu_lo, mu_hi = neighbours(mu_grid, mu0)
    n_lo, n_hi = neighbours(n_grid, N0)
    best, seen = None, 0
    while True:
        mus = span(max(1, mu_lo), mu_hi, res.refine_mu)
        ns = span(max(1, n_lo), n_hi, res.refine_n)
        if placement.one_micro_batch:
            N, M = ns, ns
        else:
            N, M = (a.ravel() for a in np.meshgrid(ns, mus))
            keep = M <= N
            N, M = N[keep], M[keep]
        ok = grid.feasible(problem, placement, N, M)
        N, M = N[ok], M[ok]
        if len(N) == 0:
            return best, seen
        choice = inner(problem, placement, N, M)
        seen += len(N)
        idx = _best_of(problem, choice, 1)
        if idx:
            cand = choice.take([idx[0]])
            if best is None or cand.throughput(problem.workload.gen_len)[0] > best.throughput(problem.workload.gen_len)[0]:
                best = cand
        if best is None:
            return None, seen
        mu_step = int(mus[1] - mus[0]) if len(mus) > 1 else 1
        n_step = int(ns[1] - ns[0]) if len(ns) > 1 else 1
        if mu_step <= 1 and n_step <= 1:
            return best, seen
        Nb, mb = int(best.batch_size[0]), int(best.micro_batch_size[0])
        mu_lo, mu_hi = mb - mu_step + 1, mb + mu_step - 1
        n_lo, n_hi = Nb - n_step + 1, Nb + n_step - 1


def _found(placement: PlacementOption, choice: grid.Choice, i: int, gen_len: int, seen: int) -> Found:
    return Found(placement=placement, batch_size=int(choice.batch_size[i]), micro_batch_size=int(choice.micro_batch_size[i]),
                 experts=int(choice.experts[i]), kv_gpu_frac=float(choice.kv_gpu_frac[i]),
                 total_s=float(choice.total_s[i]), throughput_tok_s=float(choice.throughput(gen_len)[i]),
                 pairs_evaluated=seen)


def best_policy(problem: Problem, placements, *, solver: str = "grid", resolution: Resolution | None = None,
                pairs: Pairs | None = None) -> Found | None:
    """The best (placement, N, mu, e, r_c) over `placements`, or None when nothing fits."""
    inner = _inner(solver)
    res = resolution or (MILP_RESOLUTION if solver == "milp" else GRID_RESOLUTION)
    gen = problem.workload.gen_len
    stage1 = []      # (placement, Choice over its stage-1 pairs)
    seen = 0
    for placement in placements:
        if pairs is not None:
            N, M = pairs.arrays()
            if placement.one_micro_batch:
                N = M = np.unique(np.asarray(pairs.batch_sizes, np.int64))
        else:
            N, M = _stage1_pairs(problem, placement, res)
        if len(N) == 0:
            continue
        ok = grid.feasible(problem, placement, N, M)
        N, M = N[ok], M[ok]
        if len(N) == 0:
            continue
        choice = inner(problem, placement, N, M)
        seen += len(N)
        stage1.append((placement, choice))
    if not stage1:
        return None
    ranked = sorted(((float(c.throughput(gen)[i]), k, i) for k, (p, c) in enumerate(stage1)
                     for i in _best_of(problem, c, res.refine_top)), reverse=True)
    if not ranked:
        return None
    if pairs is not None:
        _, k, i = ranked[0]
        return _found(stage1[k][0], stage1[k][1], i, gen, seen)
    best = None
    for _, k, i in ranked[:res.refine_top]:
        placement, choice = stage1[k]
        mu_grid = np.unique(choice.micro_batch_size)
        same_mu = choice.micro_batch_size == choice.micro_batch_size[i]
        n_grid = np.unique(choice.batch_size[same_mu] if not placement.one_micro_batch else choice.batch_size)
        refined, n = _refine(problem, placement, inner, res, int(choice.batch_size[i]), int(choice.micro_batch_size[i]),
                             mu_grid, n_grid)
        seen += n
        for cand_choice, j in ((choice, i), (refined, 0)):
            if cand_choice is None:
                continue
            cand = _found(placement, cand_choice, j, gen, 0)
            if best is None or cand.throughput_tok_s > best.throughput_tok_s:
                best = cand
    return Found(**{**best.__dict__, "pairs_evaluated": seen})


# ---------------------------------------------------------------------------------------------------
# infeasible requests

def diagnose(problem: Problem, placements) -> str:
    """One line: what is missing, and by how much, fully streamed (no expert resident on the GPU, KV on
    the CPU) with one sequence, in the placement that comes closest to fitting."""
    spec, b = problem.spec, problem.budgets
    non_expert = spec.non_expert_params * spec.dtypes.weight_bytes
    if b.gpu_bytes < non_expert:
        return (f"GPU budget {format_size(b.gpu_bytes)} is smaller than the non-expert weights of {spec.name} "
                f"({format_size(non_expert)}): short by {format_size(non_expert - b.gpu_bytes)}")
    best = None
    for placement in placements:
        e = grid.fixed_experts(problem, placement) or 0
        r_c = float(placement.kv_gpu_frac or 0.0)
        m = memory_use(problem.setting(placement), 1, 1, e / spec.num_experts, r_c)
        gpu, cpu = float(m.gpu_bytes), float(m.cpu_bytes)
        short = (max(gpu - b.gpu_bytes, 0.0), max(cpu - b.cpu_bytes, 0.0))
        if best is None or sum(short) < sum(best[2]):
            best = (gpu, cpu, short)
    gpu, cpu, _ = best
    parts = b.shortfalls(gpu, cpu)
    if not parts:      # fits fully streamed, yet no candidate fitted: report the search space
        return f"no policy of {spec.name} fits the budgets in the searched placements"
    return f"{spec.name} does not fit even fully streamed with one sequence: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------
# the public entry point

def make_problem(spec: ModelSpec, hardware: HardwareProfile, workload: Workload, *, budgets: Budgets | None = None,
                 gpu_memory=None, cpu_memory=None, gpu_frac: float | None = None,
                 cpu_frac: float | None = None, pin_all_weights: bool = True,
                 use_measured: bool = True) -> Problem:
    if budgets is None:
        budgets = Budgets.from_hardware(hardware, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                                        gpu_frac=gpu_frac, cpu_frac=cpu_frac)
    return Problem(spec, hardware, workload, budgets, pin_all_weights=pin_all_weights, use_measured=use_measured)


def search(spec: ModelSpec, hardware: HardwareProfile, workload: Workload, *, solver: str = "grid",
           mode: str = "default", budgets: Budgets | None = None, gpu_memory=None, cpu_memory=None,
           gpu_frac: float | None = None, cpu_frac: float | None = None,
           placements: tuple[PlacementOption, ...] | None = None, pairs: Pairs | None = None,
           resolution: Resolution | None = None, pin_all_weights: bool = True, use_measured: bool = True):
    """The best policy as a `Plan` (raises SearchError with a one-line reason when nothing fits).

    mode="default": our model, end-to-end throughput, placements runtime_placements(spec) unless given.
    mode="paper": the MoE-Lightning artifact's cost model and search (optimizer/paper.py); budgets are
    then its own caps (0.86 of GPU, 0.8 of CPU memory) and gpu_memory / cpu_memory replace m_g / m_c.
    """
    if solver not in SOLVERS:
        raise SearchError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if mode == "paper":
        return paper_plan(spec, hardware, workload, gpu_memory=gpu_memory, cpu_memory=cpu_memory)
    if mode != "default":
        raise SearchError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
    problem = make_problem(spec, hardware, workload, budgets=budgets, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                           gpu_frac=gpu_frac, cpu_frac=cpu_frac, pin_all_weights=pin_all_weights,
                           use_measured=use_measured)
    return solve(problem, solver=solver, placements=placements, pairs=pairs, resolution=resolution)


def solve(problem: Problem, *, solver: str = "grid", placements: tuple[PlacementOption, ...] | None = None,
          pairs: Pairs | None = None, resolution: Resolution | None = None):
    """The best policy for a Problem (model, machine, workload, budgets) as a `Plan`, by our model;
    `search` builds the problem from its arguments and calls this."""
    if solver not in SOLVERS:
        raise SearchError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    placements = tuple(placements or runtime_placements(problem.spec))
    t0 = time.perf_counter()
    found = best_policy(problem, placements, solver=solver, resolution=resolution, pairs=pairs)
    elapsed = time.perf_counter() - t0
    if found is None:
        raise SearchError(diagnose(problem, placements))
    return plan_from_found(problem, found, solver=solver, mode="default", search_time_s=elapsed)


def paper_plan(spec: ModelSpec, hw: HardwareProfile, workload: Workload, *, gpu_memory=None, cpu_memory=None):
    """A Plan for the artifact's choice: policy with A_g = 0, F_g = 1, int(n_e r_w) resident experts; the
    Plan's Estimate is our model's prediction for it, `plan.paper` the artifact model's."""
    t0 = time.perf_counter()
    pred = paper.paper_search(spec, hw, workload, gpu_memory=gpu_memory, cpu_memory=cpu_memory)
    elapsed = time.perf_counter() - t0
    policy = Policy(batch_size=pred.batch_size, micro_batch_size=pred.micro_batch_size, attention_on_gpu=False,
                    ffn_on_gpu=True, weights_gpu_frac=pred.resident_experts / spec.num_experts, kv_gpu_frac=0.0,
                    schedule="cgopipe")
    budgets = Budgets(gpu_bytes=pred.gpu_cap_bytes, cpu_bytes=pred.cpu_cap_bytes,
                      gpu_source=f"artifact cap {paper.GPU_CAP:g} x m_g", cpu_source=f"artifact cap {paper.CPU_CAP:g} x m_c")
    problem = Problem(spec, hw, workload, budgets)
    return build_plan(problem, policy, budgets=budgets, solver="lp", mode="paper", search_time_s=elapsed, paper=pred)
