"""Predicted throughput over a grid of (N, mu): the numbers behind the heatmap (numpy + hrm only).

The grid composes hrm.estimate's vectorised terms exactly as `hrm.estimate.estimate()` composes them for
one policy (prefill layers + LM head, decode steps priced at the workload's context samples), so a cell
equals `estimate(...).throughput_tok_s` of the same policy; tests/test_viz.py checks that.

At each (N, mu) the expert fraction r_w is either fixed or, by default, the best feasible one among the
whole-expert fractions k / n_e (the runtime realises r_w per whole expert).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hrm import estimate as est
from hrm.hardware import HardwareProfile
from hrm.spec import ModelSpec, Workload

FALLBACK_BUDGET_FRAC = 0.9
"""Share of each memory a plan may use when optimizer.space is not importable (its default is 0.9 too)."""

FEASIBLE, NOT_APPLICABLE, GPU_LIMIT, CPU_LIMIT, GPU_AND_CPU_LIMIT = 0, 1, 2, 3, 4
STATUS_LABELS = {
    FEASIBLE: "feasible",
    NOT_APPLICABLE: "mu > N (not a policy)",
    GPU_LIMIT: "over the GPU memory budget",
    CPU_LIMIT: "over the CPU memory budget",
    GPU_AND_CPU_LIMIT: "over both memory budgets",
}
"""A cell is over the GPU budget when no r_w fits the GPU; over the CPU budget when every r_w that fits
the GPU breaks the CPU budget; over both when no r_w fits either."""
MAX_RW_CANDIDATES = 33


@dataclass(frozen=True)
class ThroughputGrid:
    """Arrays indexed [mu index, N index]."""
    batch_sizes: np.ndarray          # N values (columns)
    micro_batch_sizes: np.ndarray    # mu values (rows)
    throughput_tok_s: np.ndarray     # end-to-end generated tok/s at the chosen r_w (nan where mu > N)
    weights_gpu_frac: np.ndarray     # r_w used in each cell
    gpu_bytes: np.ndarray            # peak GPU memory at that r_w
    cpu_bytes: np.ndarray            # peak CPU memory at that r_w
    status: np.ndarray               # FEASIBLE, NOT_APPLICABLE, GPU_LIMIT, CPU_LIMIT, GPU_AND_CPU_LIMIT
    gpu_budget_bytes: float
    cpu_budget_bytes: float
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
    """Bytes a policy may use on all GPUs together and in host memory (optimizer.space.Budgets has the
    same two fields; either works wherever `budgets` is accepted)."""
    gpu_bytes: float
    cpu_bytes: float


def resolve_budgets(hw: HardwareProfile, budgets=None) -> MemoryBudgets:
    """The given budgets (anything with gpu_bytes and cpu_bytes), else the optimizer's defaults for `hw`."""
    if budgets is not None:
        return MemoryBudgets(float(budgets.gpu_bytes), float(budgets.cpu_bytes))
    try:
        from optimizer.space import Budgets
    except ImportError:
        return MemoryBudgets(FALLBACK_BUDGET_FRAC * hw.gpu.memory_bytes * hw.gpu.count,
                             FALLBACK_BUDGET_FRAC * hw.cpu.memory_bytes)
    b = Budgets.from_hardware(hw)
    return MemoryBudgets(b.gpu_bytes, b.cpu_bytes)


def geometric_ints(lo: int, hi: int, n: int) -> np.ndarray:
    """About n distinct integers spread geometrically over [lo, hi]."""
    lo, hi = max(1, int(lo)), max(1, int(hi))
    return np.unique(np.round(np.geomspace(lo, max(hi, lo), max(n, 1))).astype(int))


def _max(*terms):
    arrays = np.broadcast_arrays(*[np.asarray(t, float) for t in terms])
    return np.max(np.stack(arrays), axis=0)


def predicted_throughput(s: est.Setting, N, mu, r_w, r_c=0.0):
    """End-to-end generated tok/s (prefill + decode), broadcast over arrays of N, mu and r_w.

    Mirrors hrm.estimate.estimate(): prefill = L * max(prefill terms) + LM head; decode = the sum over
    context samples of step_time(max(decode terms)) times the steps each sample stands for.
    """
    spec, wl = s.spec, s.workload
    L = spec.num_hidden_layers
    head = est.lm_head_time(s, N)
    pre = est.prefill_layer_times(s, N, mu, r_w, r_c)
    prefill = L * _max(pre.gpu_s, pre.h2d_s, pre.d2h_s, pre.link_s) + head
    decode = 0.0
    ctxs, weights = est.context_samples(wl)
    for ctx, w in zip(ctxs, weights):
        lt = est.decode_layer_times(s, N, mu, r_w, r_c, ctx)
        t_layer = _max(*lt.terms(s.schedule).values())
        decode = decode + w * est.step_time(t_layer, lt, L, head)
    return np.asarray(N, float) * wl.gen_len / (prefill + decode)


def weights_fractions(spec: ModelSpec, r_w=None) -> np.ndarray:
    """Candidate r_w values: the given one, or whole-expert fractions k / n_e (at most 33 of them)."""
    if r_w is not None:
        return np.atleast_1d(np.asarray(r_w, float))
    E = spec.num_experts
    ks = np.unique(np.round(np.linspace(0, E, min(E + 1, MAX_RW_CANDIDATES))).astype(int))
    return ks / E


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


def throughput_grid(spec: ModelSpec, hw: HardwareProfile, workload: Workload, batch_sizes=None,
                    micro_batch_sizes=None, *, weights_gpu_frac=None, kv_gpu_frac: float = 0.0,
                    attention_on_gpu: bool = False, ffn_on_gpu: bool = True, schedule: str = "cgopipe",
                    budgets=None, pin_all_weights: bool = True, use_measured: bool = True,
                    n_batch: int = 40, n_micro: int = 40) -> ThroughputGrid:
    """Predicted throughput and memory feasibility at every (N, mu) of the grid.

    batch_sizes, micro_batch_sizes: the axes (default: n_batch x n_micro geometric values reaching past
        the memory limits).
    weights_gpu_frac: a fixed r_w, or None for the best feasible whole-expert fraction per cell.
    budgets: anything with gpu_bytes and cpu_bytes (optimizer.space.Budgets, MemoryBudgets); default
        the optimizer's default budgets for `hw`.
    """
    b = resolve_budgets(hw, budgets)
    if batch_sizes is None or micro_batch_sizes is None:
        dn, dm = default_ranges(spec, hw, workload, n_batch, n_micro, budgets=b)
        batch_sizes = dn if batch_sizes is None else batch_sizes
        micro_batch_sizes = dm if micro_batch_sizes is None else micro_batch_sizes
    Ns = np.asarray(batch_sizes, dtype=np.int64)
    mus = np.asarray(micro_batch_sizes, dtype=np.int64)
    s = est.Setting(spec, hw, workload, attention_on_gpu, ffn_on_gpu, schedule, pin_all_weights, use_measured)
    rws = weights_fractions(spec, weights_gpu_frac)

    N = Ns[None, :, None]
    mu_raw = mus[:, None, None]
    mu = np.minimum(mu_raw, N)                       # priced where mu <= N; the rest is masked
    rw = rws[None, None, :]
    tput = predicted_throughput(s, N, mu, rw, kv_gpu_frac)
    mem = est.memory_use(s, N, mu, rw, kv_gpu_frac)
    shape = np.broadcast_shapes(N.shape, mu.shape, rw.shape)
    gpu_b = np.broadcast_to(np.asarray(mem.gpu_bytes, float), shape)
    cpu_b = np.broadcast_to(np.asarray(mem.cpu_bytes, float), shape)
    tput = np.broadcast_to(tput, shape)
    gpu_budget, cpu_budget = b.gpu_bytes, b.cpu_bytes
    gpu_ok, cpu_ok = gpu_b <= gpu_budget, cpu_b <= cpu_budget
    ok = gpu_ok & cpu_ok

    # best feasible r_w per cell; where none is feasible, the r_w that uses the least GPU memory
    pick = np.where(ok.any(axis=2), np.argmax(np.where(ok, tput, -np.inf), axis=2), np.argmin(gpu_b, axis=2))
    take = lambda a: np.take_along_axis(a, pick[..., None], axis=2)[..., 0]   # noqa: E731
    status = np.full(pick.shape, FEASIBLE, dtype=np.int8)
    gpu_never, cpu_never = ~gpu_ok.any(axis=2), ~cpu_ok.any(axis=2)
    status[~ok.any(axis=2)] = CPU_LIMIT              # some r_w fits the GPU, none of those fits the CPU
    status[gpu_never] = GPU_LIMIT
    status[gpu_never & cpu_never] = GPU_AND_CPU_LIMIT
    applicable = np.broadcast_to(mus[:, None] <= Ns[None, :], pick.shape)
    status[~applicable] = NOT_APPLICABLE
    label = f"{spec.name} on {hw.name}, prompt {workload.prompt_len:g} + gen {workload.gen_len}"
    return ThroughputGrid(
        batch_sizes=Ns, micro_batch_sizes=mus,
        throughput_tok_s=np.where(applicable, take(tput), np.nan), weights_gpu_frac=take(np.broadcast_to(rw, shape)),
        gpu_bytes=take(gpu_b), cpu_bytes=take(cpu_b), status=status,
        gpu_budget_bytes=gpu_budget, cpu_budget_bytes=cpu_budget, label=label,
    )
