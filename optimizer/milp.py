"""MILP (pulp + bundled CBC): the best resident-expert count and KV fraction for many (N, mu) pairs.

For each pair i the model has an integer e_i in [0, n_e] (r_w = e_i / n_e), r_c,i in whole micro-batches
(fixed when the placement fixes it), an epigraph variable t_pre,i >= every prefill term and one
t_i,j >= every decode term at each context sample j. Its time is hrm.estimate.PassTerms.compose with
those variables as the layer times:
    L * t_pre,i + once_i + sum_j w_j * step_time(t_i,j)
subject to GPU and CPU bytes within the budgets. Every term and byte comes from hrm.estimate's functions
called with pulp expressions for r_w and r_c (object arrays: one entry per pair), so the equations are
the ones the grid search evaluates with numpy. Pairs are independent, so one CBC call minimises the sum
of many pairs' times and each pair gets its own optimum.
"""
from __future__ import annotations

import tempfile

import numpy as np

from hrm import estimate as hrm
from . import grid
from hrm.policy import realised_kv_frac
from .space import PlacementOption, Problem

CHUNK = 64
"""Pairs per CBC call."""


def _at(value, i: int):
    """Entry i of a per-pair quantity (a scalar applies to every pair)."""
    return value if np.ndim(value) == 0 else value[i]


def cbc():
    """The bundled CBC, quiet (PuLP 3.3 flags PULP_CBC_CMD as deprecated for 4.0; it is what ships)."""
    import warnings

    import pulp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, gapRel=1e-9)


def new_var(prob, name: str, low=None, up=None, integer: bool = False):
    """A variable attached to `prob` (PuLP >= 3.3), or a free-standing LpVariable on older PuLP."""
    import pulp
    cat = pulp.LpInteger if integer else pulp.LpContinuous
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, lowBound=low, upBound=up, cat=cat)


def _scale(terms: dict, P: int) -> np.ndarray:
    """Per pair, the largest of the terms (a positive size to measure them in)."""
    largest = np.broadcast_to(hrm.max_of(terms), (P,))
    return np.where(largest > 0, largest, 1.0)


def _solve_chunk(problem: Problem, placement: PlacementOption, N: np.ndarray, mu: np.ndarray):
    """The expert counts e of one chunk's pairs, or None when CBC found no optimum."""
    import pulp

    spec, b = problem.spec, problem.budgets
    E, P = spec.num_experts, len(N)
    s = problem.setting(placement)
    prob = pulp.LpProblem("moe_lightning_policy", pulp.LpMinimize)
    e_fixed = grid.fixed_experts(problem, placement)
    if e_fixed is None:
        e_vars = [new_var(prob, f"e_{i}", 0, E, integer=True) for i in range(P)]
        r_w = np.array([v * (1.0 / E) for v in e_vars], dtype=object)
    else:
        e_vars = None
        r_w = np.full(P, e_fixed / E)
    m = -(-np.asarray(N, np.int64) // np.asarray(mu, np.int64))      # micro-batches per pair
    if placement.searches_kv:
        # r_c in whole micro-batches, as the runtime realises it: k_i of m_i micro-batches keep their KV
        r_c = np.array([new_var(prob, f"kv_mbs_{i}", 0, int(m[i]), integer=True) * (1.0 / float(m[i]))
                        for i in range(P)], dtype=object)
    else:
        r_c = realised_kv_frac(np.full(P, float(placement.kv_gpu_frac or 0.0)), m)

    # Scaling: CBC's tolerances are absolute (~1e-7), so every constraint is written in units of its own
    # size: bytes / budget, and each pair's layer times / that pair's layer time at r_w = r_c = 0.
    mem = hrm.memory_use(s, N, mu, r_w, r_c)
    gpu, cpu = mem.gpu_bytes, mem.cpu_bytes
    for i in range(P):
        prob += _at(gpu, i) * (1 / b.gpu_bytes) <= 1, f"gpu_mem_{i}"
        prob += _at(cpu, i) * (1 / b.cpu_bytes) <= 1, f"cpu_mem_{i}"

    zero_w, zero_c = np.zeros(P), np.zeros(P)
    reference = hrm.pass_terms(s, N, mu, zero_w, zero_c)      # each layer time's size, for its scale
    ref_terms = {"prefill": reference.prefill, **{("decode", j): t for j, (_, t, _) in enumerate(reference.decode)}}

    def epigraph(terms: dict, key):
        """The layer time of `terms`: a variable per pair, in units of its size at r_w = r_c = 0, at least
        every term."""
        ref = _scale(ref_terms[key], P)
        tag = "pre" if key == "prefill" else f"dec_{key[1]}"
        tau = [new_var(prob, f"t_{tag}_{i}", 0) for i in range(P)]
        for name, term in terms.items():
            for i in range(P):
                prob.addConstraint(tau[i] >= _at(term, i) * (1 / ref[i]), f"{tag}_{name}_{i}")
        return np.array([ref[i] * tau[i] for i in range(P)], dtype=object)

    prefill, decode = hrm.pass_terms(s, N, mu, r_w, r_c).compose(epigraph)
    ref_total = np.asarray(np.add(*reference.compose()), float)
    objective = [(_at(prefill, i) + _at(decode, i)) * (1 / float(ref_total[i])) for i in range(P)]
    prob += pulp.lpSum(objective)
    solver = cbc()
    with tempfile.TemporaryDirectory(prefix="moe-lightning-cbc-") as tmp:   # removed on Ctrl-C too
        solver.tmpDir = tmp
        status = prob.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        return None
    # r_c is not read back: _realise takes the most KV the budget allows, which never costs time
    return np.array([int(round(v.value())) for v in e_vars]) if e_vars is not None else np.full(P, e_fixed)


def best_per_pair(problem: Problem, placement: PlacementOption, N, mu) -> grid.Choice:
    """Same contract as grid.best_per_pair, solved as a MILP."""
    N = np.atleast_1d(np.asarray(N, np.int64))
    mu = np.atleast_1d(np.asarray(mu, np.int64))
    P = len(N)
    e = np.zeros(P, np.int64)
    ok = grid.feasible(problem, placement, N, mu) if P else np.zeros(0, bool)
    idx = np.flatnonzero(ok)
    for start in range(0, len(idx), CHUNK):
        part = idx[start:start + CHUNK]
        solved = _solve_chunk(problem, placement, N[part], mu[part])
        if solved is None:      # numerical trouble in a batch: solve its pairs one by one
            for i in part:
                one = _solve_chunk(problem, placement, N[[i]], mu[[i]])
                if one is None:
                    ok[i] = False
                else:
                    e[i] = one[0]
        else:
            e[part] = solved
    return _realise(problem, placement, N, mu, e, ok)


def _realise(problem, placement, N, mu, e, ok) -> grid.Choice:
    """Take r_c as the most KV the GPU budget allows in whole micro-batches (what the runtime realises;
    more KV on the GPU never costs time and only relieves the CPU, so the MILP's r_c is at most that),
    and price the result with the numpy composition the grid uses."""
    s = problem.setting(placement)
    r_w = e / problem.num_experts
    g0, gs, c0, cs = grid.memory_lines(s, N, mu, r_w)
    m = -(-np.asarray(N) // np.asarray(mu))
    rc, fits = grid.kv_for_budget(problem, placement, g0, gs, c0, cs, m)
    ok = ok & fits
    prefill, decode = hrm.pass_time(s, N, mu, r_w, rc)
    total = np.where(ok, prefill + decode, np.inf)
    return grid.Choice(N, mu, np.where(ok, e, 0).astype(np.int64), np.where(ok, rc, 0.0), total, ok)
