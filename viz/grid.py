"""Predicted throughput over a grid of (N, mu): the numbers behind the heatmap (numpy, hrm, optimizer).

Each cell is what the optimizer would pick at that (N, mu) for one placement: `optimizer.grid.best_per_pair`
chooses the resident experts e (r_w = e / n_e) and the KV fraction r_c exactly as `optimizer.search` does,
pricing them with hrm.estimate's terms composed as `hrm.estimate.estimate()` composes them. So a cell
equals `estimate(...).throughput_tok_s` of that policy, and the grid's best cell equals the plan that
`search(..., pairs=Pairs(grid axes))` returns (tests/test_viz.py checks both).

Cells where no (e, r_c) fits are labelled by the budget they break: over the GPU budget when no choice
fits the GPU; over the CPU budget when every choice that fits the GPU breaks the CPU budget; over both
when no choice fits either.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hrm.estimate import pass_time
from hrm.hardware import HardwareProfile
from hrm.policy import Placement
from hrm.spec import ModelSpec, Workload
from optimizer import grid as og
from optimizer.space import Budgets, PlacementOption, Problem

FEASIBLE, NOT_APPLICABLE, GPU_LIMIT, CPU_LIMIT, GPU_AND_CPU_LIMIT = 0, 1, 2, 3, 4
STATUS_LABELS = {
    FEASIBLE: "feasible",
    NOT_APPLICABLE: "mu > N (not a policy)",
    GPU_LIMIT: "over the GPU memory budget",
    CPU_LIMIT: "over the CPU memory budget",
    GPU_AND_CPU_LIMIT: "over both memory budgets",
}
CPU_ATTENTION = PlacementOption("cpu-attention", Placement(attention_on_gpu=False, ffn_on_gpu=True, schedule="cgopipe"))
"""The paper's placement (attention on the CPU, experts paged to the GPU, CGOPipe): the default."""


@dataclass(frozen=True)
class ThroughputGrid:
    """Arrays indexed [mu index, N index]."""
    batch_sizes: np.ndarray          # N values (columns)
    micro_batch_sizes: np.ndarray    # mu values (rows)
    throughput_tok_s: np.ndarray     # end-to-end generated tok/s at the chosen r_w (nan where mu > N)
    weights_gpu_frac: np.ndarray     # r_w chosen in each cell (the least-GPU one where nothing fits)
    kv_gpu_frac: np.ndarray          # r_c chosen in each cell
    gpu_bytes: np.ndarray            # peak GPU memory at that r_w
    cpu_bytes: np.ndarray            # peak CPU memory at that r_w
    status: np.ndarray               # FEASIBLE, NOT_APPLICABLE, GPU_LIMIT, CPU_LIMIT, GPU_AND_CPU_LIMIT
    gpu_budget_bytes: float
    cpu_budget_bytes: float
    placement: PlacementOption
    label: str                       # model / hardware / workload, for titles

    @property
    def feasible(self) -> np.ndarray:
        return self.status == FEASIBLE

    def best(self):
        """(N, mu, r_w, tok/s) of the best feasible cell, or None when no cell is feasible."""
        tput = np.where(self.feasible, self.throughput_tok_s, -np.inf)
        if not np.isfinite(tput).any():
            return None
        i, j = np.unravel_index(int(np.argmax(tput)), tput.shape)
        return (int(self.batch_sizes[j]), int(self.micro_batch_sizes[i]), float(self.weights_gpu_frac[i, j]),
                float(tput[i, j]))


@dataclass(frozen=True)
class MemoryBudgets:
    """Bytes a policy may use on all GPUs together and in host memory (the two fields of
    optimizer.space.Budgets; either works wherever `budgets` is accepted)."""
    gpu_bytes: float
    cpu_bytes: float


def resolve_budgets(hw: HardwareProfile, budgets=None) -> Budgets:
    """The given budgets (anything with gpu_bytes and cpu_bytes), else the optimizer's defaults for `hw`."""
    if budgets is None:
        return Budgets.from_hardware(hw)
    if isinstance(budgets, Budgets):
        return budgets
    return Budgets(gpu_bytes=float(budgets.gpu_bytes), cpu_bytes=float(budgets.cpu_bytes))


def geometric_ints(lo: int, hi: int, n: int) -> np.ndarray:
    """About n distinct integers spread geometrically over [lo, hi]."""
    lo, hi = max(1, int(lo)), max(1, int(hi))
    return np.unique(np.round(np.geomspace(lo, max(hi, lo), max(n, 1))).astype(int))


def default_ranges(spec: ModelSpec, hw: HardwareProfile, workload: Workload, n_batch: int = 40,
                   n_micro: int = 40, budgets=None):
    """N and mu axes that reach past the memory limits, so the feasible boundary shows.

    N runs to about twice what host memory holds (KV + staged hidden states per sequence) once the
    experts that do not fit the GPU are stored there; mu to the same bound or 4096, whichever is smaller.
    """
    per_seq = workload.max_context_len * spec.kv_bytes_per_token + workload.prompt_len * spec.hidden_size * \
        spec.dtypes.act_bytes
    experts = spec.num_moe_layers * spec.num_experts * spec.expert_bytes
    b = resolve_budgets(hw, budgets)
    gpu_room = b.gpu_bytes - spec.non_expert_params * spec.dtypes.weight_bytes
    room = b.cpu_bytes - max(experts - max(gpu_room, 0.0), 0.0)
    n_max = int(np.clip(2 * max(room, 0.0) / per_seq, 64, 65536))
    return geometric_ints(1, n_max, n_batch), geometric_ints(1, min(n_max, 4096), n_micro)


def placement_of(policy=None, *, attention_on_gpu=None, ffn_on_gpu=None, schedule=None, weights_gpu_frac=None,
                 kv_gpu_frac=None) -> PlacementOption:
    """A PlacementOption for the heatmap: a policy's attention/FFN placement and schedule (else the paper's),
    with r_w and r_c fixed where given, searched where None (as the optimizer does)."""
    base = CPU_ATTENTION
    if policy is not None:
        attention_on_gpu = policy.attention_on_gpu if attention_on_gpu is None else attention_on_gpu
        ffn_on_gpu = policy.ffn_on_gpu if ffn_on_gpu is None else ffn_on_gpu
        schedule = policy.schedule if schedule is None else schedule
    a = base.attention_on_gpu if attention_on_gpu is None else bool(attention_on_gpu)
    f = base.ffn_on_gpu if ffn_on_gpu is None else bool(ffn_on_gpu)
    sched = schedule or ("s4" if a else "cgopipe")
    placement = Placement(a, f, sched)
    return PlacementOption(placement.describe(), placement,
                     weights_gpu_frac=None if weights_gpu_frac is None else float(weights_gpu_frac),
                     kv_gpu_frac=None if kv_gpu_frac is None else float(kv_gpu_frac))


def throughput_grid(spec: ModelSpec, hw: HardwareProfile, workload: Workload, batch_sizes=None,
                    micro_batch_sizes=None, *, placement: PlacementOption | None = None, budgets=None,
                    weights_gpu_frac=None, kv_gpu_frac=None, attention_on_gpu=None, ffn_on_gpu=None,
                    schedule=None, pin_all_weights: bool = True, use_measured: bool = True,
                    n_batch: int = 40, n_micro: int = 40) -> ThroughputGrid:
    """Predicted throughput and memory feasibility at every (N, mu) of the grid, for one placement.

    batch_sizes, micro_batch_sizes: the axes (default: n_batch x n_micro geometric values reaching past
        the memory limits).
    placement: an optimizer.space.PlacementOption; default built by `placement_of` from attention_on_gpu,
        ffn_on_gpu, schedule (the paper's CPU-attention CGOPipe when none is given) and the fixed
        fractions weights_gpu_frac / kv_gpu_frac (None: chosen per cell as the optimizer does).
    budgets: anything with gpu_bytes and cpu_bytes (optimizer.space.Budgets); default the optimizer's.
    """
    b = resolve_budgets(hw, budgets)
    if placement is None:
        placement = placement_of(attention_on_gpu=attention_on_gpu, ffn_on_gpu=ffn_on_gpu, schedule=schedule,
                                 weights_gpu_frac=weights_gpu_frac, kv_gpu_frac=kv_gpu_frac)
    if batch_sizes is None or micro_batch_sizes is None:
        dn, dm = default_ranges(spec, hw, workload, n_batch, n_micro, budgets=b)
        batch_sizes = dn if batch_sizes is None else batch_sizes
        micro_batch_sizes = dm if micro_batch_sizes is None else micro_batch_sizes
    Ns = np.asarray(batch_sizes, dtype=np.int64)
    mus = np.asarray(micro_batch_sizes, dtype=np.int64)
    problem = Problem(spec, hw, workload, b, pin_all_weights=pin_all_weights, use_measured=use_measured)

    shape = (len(mus), len(Ns))
    Ngrid, Mgrid = np.meshgrid(Ns, mus)                   # [mu, N]
    valid = Mgrid <= Ngrid
    N, M = Ngrid[valid], Mgrid[valid]

    choice = og.best_per_pair(problem, placement, N, M)
    # memory of every candidate (e, r_c): which budgets break where nothing fits
    s = problem.setting(placement)
    es, r_c, _ = og.feasible_experts(problem, placement, N, M)
    g0, gs, c0, cs = og.memory_lines(s, N, M, (es / spec.num_experts)[:, None])
    gpu_b, cpu_b = g0 + r_c * gs, c0 + r_c * cs                       # [candidate, pair]
    gpu_ok, cpu_ok = gpu_b <= b.gpu_bytes * (1 + 1e-9), cpu_b <= b.cpu_bytes * (1 + 1e-9)
    k_least_gpu = np.argmin(gpu_b, axis=0)
    k_chosen = np.argmax(es[:, None] == choice.experts[None, :], axis=0)
    k = np.where(choice.feasible, k_chosen, k_least_gpu)
    cols = np.arange(len(N))

    status = np.full(len(N), FEASIBLE, dtype=np.int8)
    gpu_never, cpu_never = ~gpu_ok.any(axis=0), ~cpu_ok.any(axis=0)
    status[~choice.feasible] = CPU_LIMIT           # some choice fits the GPU, none of those fits the CPU
    status[gpu_never] = GPU_LIMIT
    status[gpu_never & cpu_never] = GPU_AND_CPU_LIMIT

    def scatter(values, fill):
        out = np.full(shape, fill, dtype=np.asarray(values).dtype if fill is not np.nan else float)
        out[valid] = values
        return out

    tput = np.where(choice.feasible, N * float(workload.gen_len) / np.where(choice.feasible, choice.total_s, 1.0),
                    0.0)
    # infeasible cells: priced anyway at the least-GPU choice, for reference (never shown as feasible)
    if (~choice.feasible).any():
        bad = ~choice.feasible
        e_bad = es[k_least_gpu[bad]]
        pre, dec = pass_time(s, N[bad], M[bad], e_bad / spec.num_experts, r_c[k_least_gpu[bad], cols[bad]])
        tput[bad] = N[bad] * float(workload.gen_len) / (pre + dec)
    label = f"{spec.name} on {hw.name}, prompt {workload.prompt_len:g} + gen {workload.gen_len}"
    status_full = np.full(shape, NOT_APPLICABLE, dtype=np.int8)
    status_full[valid] = status
    return ThroughputGrid(
        batch_sizes=Ns, micro_batch_sizes=mus,
        throughput_tok_s=scatter(tput.astype(float), np.nan),
        weights_gpu_frac=scatter((es[k] / spec.num_experts).astype(float), np.nan),
        kv_gpu_frac=scatter(r_c[k, cols].astype(float), np.nan),
        gpu_bytes=scatter(gpu_b[k, cols].astype(float), np.nan),
        cpu_bytes=scatter(cpu_b[k, cols].astype(float), np.nan),
        status=status_full, gpu_budget_bytes=float(b.gpu_bytes), cpu_budget_bytes=float(b.cpu_bytes),
        placement=placement, label=label,
    )
