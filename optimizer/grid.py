"""Vectorised numpy search: for many (N, mu) pairs at once, the best whole-expert count e and KV fraction.

Arrays are laid out [candidate, pair]: the pair axis (N, mu) is last, so hrm's per-pair quantities
(shape [pair]) broadcast against per-candidate fractions r_w = e / n_e (shape [candidate, pair]). Every
time and byte comes from hrm.estimate's functions, composed exactly as `hrm.estimate.estimate()` does
(tests/test_optimizer_grid.py checks each chosen point against `estimate()`).

Why the inner choice is exact:
- every term is linear in r_w and r_c, the layer time a max of them, and prefill/decode time a positive
  combination of such maxima, so the total time is convex in (r_w, r_c);
- every term is non-increasing in r_c (more KV on the GPU streams less), so for a given e the best r_c
  is the largest the GPU budget allows, `kv_for_budget`;
- along e with r_c = kv_for_budget(e) (a concave function of e) the time stays convex, so when n_e is
  large a coarse scan of e followed by a scan of the neighbourhood of the coarse best finds the optimum.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hrm import estimate as hrm
from .space import KV_FRAC_STEP, Placement, Problem

DENSE_EXPERTS = 33
"""Up to this many expert counts (0..n_e) are all evaluated; beyond, coarse scan + refinement."""
_REL_TOL = 1e-9


@dataclass(frozen=True)
class Choice:
    """The best inner choice for each (N, mu) pair (arrays of shape [pair])."""
    batch_size: np.ndarray
    micro_batch_size: np.ndarray
    experts: np.ndarray          # resident routed experts per MoE layer on the GPU (e; r_w = e / n_e)
    kv_gpu_frac: np.ndarray
    total_s: np.ndarray          # prefill + decode (inf where infeasible)
    feasible: np.ndarray

    def throughput(self, gen_len: int) -> np.ndarray:
        return np.where(self.feasible, self.batch_size * float(gen_len) / self.total_s, -np.inf)

    def take(self, index) -> "Choice":
        return Choice(*(np.asarray(getattr(self, f))[index] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list["Choice"]) -> "Choice":
        return Choice(*(np.concatenate([np.atleast_1d(getattr(p, f)) for p in parts])
                        for f in Choice.__dataclass_fields__))


# ---------------------------------------------------------------------------------------------------
# the equations, composed as hrm.estimate.estimate() composes them

def _max(terms) -> np.ndarray:
    values = list(terms.values()) if isinstance(terms, dict) else list(terms)
    out = np.asarray(values[0], dtype=float)
    for v in values[1:]:
        out = np.maximum(out, v)
    return out


def prefill_terms(lt: hrm.LayerTimes) -> dict:
    """The resources prefill of one layer keeps busy (its time is their max), as in estimate()."""
    return {"gpu": lt.gpu_s, "h2d": lt.h2d_s, "d2h": lt.d2h_s, "link": lt.link_s}


def total_time(s: hrm.Setting, N, mu, r_w, r_c):
    """(prefill_s, decode_s), broadcast over arrays of N, mu, r_w, r_c."""
    L = s.spec.num_hidden_layers
    head = hrm.lm_head_time(s, N)
    prefill = L * _max(prefill_terms(hrm.prefill_layer_times(s, N, mu, r_w, r_c))) + head
    decode = 0.0
    for ctx, w in zip(*hrm.context_samples(s.workload)):
        lt = hrm.decode_layer_times(s, N, mu, r_w, r_c, ctx)
        decode = decode + w * hrm.step_time(_max(lt.terms(s.schedule)), lt, L, head)
    return prefill, decode


def memory_lines(s: hrm.Setting, N, mu, r_w):
    """GPU and CPU bytes as lines in r_c: (gpu at r_c=0, gpu slope, cpu at r_c=0, cpu slope)."""
    m0 = hrm.memory_use(s, N, mu, r_w, 0.0)
    m1 = hrm.memory_use(s, N, mu, r_w, 1.0)
    g0, c0 = np.asarray(m0.gpu_bytes, float), np.asarray(m0.cpu_bytes, float)
    return g0, np.asarray(m1.gpu_bytes, float) - g0, c0, np.asarray(m1.cpu_bytes, float) - c0


def kv_for_budget(problem: Problem, placement: Placement, g0, g_slope, c0, c_slope):
    """(r_c, feasible): the largest KV fraction the GPU budget allows (realised on KV_FRAC_STEP, rounded
    down), or the placement's fixed fraction; feasible where both budgets hold."""
    G, C = problem.budgets.gpu_bytes, problem.budgets.cpu_bytes
    if placement.searches_kv:
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(g_slope > 0, (G - g0) / np.where(g_slope > 0, g_slope, 1.0), 1.0)
        r_c = np.floor(np.clip(room, 0.0, 1.0) / KV_FRAC_STEP) * KV_FRAC_STEP
    else:
        r_c = np.full(np.broadcast(g0, g_slope).shape, float(placement.kv_gpu_frac or 0.0))
    gpu = g0 + r_c * g_slope
    cpu = c0 + r_c * c_slope
    ok = (gpu <= G * (1 + _REL_TOL)) & (cpu <= C * (1 + _REL_TOL))
    return r_c, ok


def fixed_experts(problem: Problem, placement: Placement) -> int | None:
    """The whole-expert count a placement fixes (the realisation Policy.resident_experts uses), if any."""
    if placement.weights_gpu_frac is None:
        return None
    return int(problem.num_experts * placement.weights_gpu_frac + 1e-9)


def _expert_candidates(problem: Problem, placement: Placement) -> np.ndarray:
    e_fixed = fixed_experts(problem, placement)
    if e_fixed is not None:
        return np.array([e_fixed])
    return np.arange(problem.num_experts + 1)


# ---------------------------------------------------------------------------------------------------
# feasibility

def feasible_experts(problem: Problem, placement: Placement, N, mu):
    """(e [K], r_c [K, P], feasible [K, P]) for every candidate expert count of every pair."""
    s = problem.setting(placement)
    E = problem.num_experts
    es = _expert_candidates(problem, placement)
    r_w = (es / E)[:, None]
    g0, gs, c0, cs = memory_lines(s, N, mu, r_w)
    r_c, ok = kv_for_budget(problem, placement, g0, gs, c0, cs)
    return es, r_c, ok


def feasible(problem: Problem, placement: Placement, N, mu) -> np.ndarray:
    """Whether some expert count (and KV fraction) fits both budgets, per pair."""
    N, mu = np.atleast_1d(np.asarray(N, np.int64)), np.atleast_1d(np.asarray(mu, np.int64))
    if N.size == 0:
        return np.zeros(0, bool)
    _, _, ok = feasible_experts(problem, placement, N, mu)
    return ok.any(axis=0)


# ---------------------------------------------------------------------------------------------------
# the best inner choice per pair

def _evaluate(problem, placement, s, N, mu, e, r_c, ok):
    """Total seconds of candidates e [K, P] (inf where not ok)."""
    E = problem.num_experts
    prefill, decode = total_time(s, N, mu, e / E, r_c)
    return np.where(ok, prefill + decode, np.inf)


def _pick(total, *arrays):
    k = np.argmin(total, axis=0)
    cols = np.arange(total.shape[1])
    return (total[k, cols],) + tuple(np.broadcast_to(a, total.shape)[k, cols] for a in arrays)


def best_per_pair(problem: Problem, placement: Placement, N, mu) -> Choice:
    """For each (N, mu) pair: the expert count and KV fraction with the least prefill + decode time."""
    N = np.atleast_1d(np.asarray(N, np.int64))
    mu = np.atleast_1d(np.asarray(mu, np.int64))
    if N.size == 0:
        z = np.zeros(0)
        return Choice(N, mu, z.astype(np.int64), z, z, z.astype(bool))
    s = problem.setting(placement)
    es, r_c, ok = feasible_experts(problem, placement, N, mu)
    e_grid = np.broadcast_to(es[:, None], ok.shape)
    if len(es) <= DENSE_EXPERTS:
        total = _evaluate(problem, placement, s, N, mu, e_grid, r_c, ok)
        t, e, rc = _pick(total, e_grid, r_c)
    else:
        t, e, rc = _coarse_then_fine(problem, placement, s, N, mu, es, r_c, ok)
    good = np.isfinite(t)
    return Choice(N, mu, np.where(good, e, 0).astype(np.int64), np.where(good, rc, 0.0), t, good)


def _coarse_then_fine(problem, placement, s, N, mu, es, r_c_all, ok_all):
    """Many experts: scan ~DENSE_EXPERTS expert counts over each pair's feasible range, then every count
    within one coarse step of the coarse best (exact for a convex time, see the module docstring)."""
    K, P = ok_all.shape
    cols = np.arange(P)
    any_ok = ok_all.any(axis=0)
    lo = np.where(any_ok, np.argmax(ok_all, axis=0), 0)
    hi = np.where(any_ok, K - 1 - np.argmax(ok_all[::-1], axis=0), 0)
    n = DENSE_EXPERTS - 1
    step = np.maximum(1, np.ceil((hi - lo) / n)).astype(np.int64)
    coarse = np.minimum(lo[None, :] + step[None, :] * np.arange(n + 1)[:, None], hi[None, :])
    total = _evaluate(problem, placement, s, N, mu, coarse, r_c_all[coarse, cols], ok_all[coarse, cols])
    _, e_best = _pick(total, coarse)
    fine = np.clip(e_best[None, :] + _offsets(step), lo[None, :], hi[None, :])
    total_f = _evaluate(problem, placement, s, N, mu, fine, r_c_all[fine, cols], ok_all[fine, cols])
    return _pick(total_f, fine, r_c_all[fine, cols])


def _offsets(step: np.ndarray) -> np.ndarray:
    """Offsets -step..step for each pair, padded by repeating 0 (shape [2 * max(step) + 1, P])."""
    m = int(step.max())
    off = np.arange(-m, m + 1)[:, None]
    return np.where(np.abs(off) <= step[None, :], off, 0)
