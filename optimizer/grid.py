"""Vectorised numpy search: for many (N, mu) pairs at once, the best whole-expert count e and KV fraction.

Arrays are laid out [candidate, pair]: the pair axis (N, mu) is last, so per-pair quantities (shape
[pair]) broadcast against per-candidate fractions r_w = e / n_e (shape [candidate, pair]). Every time and
byte comes from hrm.estimate's functions, composed exactly as `hrm.estimate.estimate()` composes them
(tests/test_optimizer_solvers.py checks chosen points against `estimate()`). Since every term is linear in
r_w and r_c, `pair_terms` calls hrm once per context sample at the three corners (r_w, r_c) = (0, 0),
(1, 0), (0, 1) and keeps each term as a + b r_w + c r_c; pricing many candidates is then plain numpy.

Why the inner choice is exact:
- every term is linear in r_w and r_c, the layer time a max of them, and prefill/decode time a positive
  combination of such maxima, so the total time is convex in (r_w, r_c);
- every term is non-increasing in r_c (more KV on the GPU streams less), so for a given e the best r_c
  is the largest the GPU budget allows, `kv_for_budget`;
- along e with r_c constant the time stays convex, so when n_e is large a coarse scan of e followed by
  a scan of the neighbourhood of the coarse best finds the optimum; r_c is realised per whole
  micro-batch, a step function of e, so the pairs where it steps along e are scanned in full.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hrm import estimate as hrm
from hrm.policy import realised_kv_frac
from .space import KV_FRAC_STEP, PlacementOption, Problem

DENSE_EXPERTS = 33
"""Up to this many expert counts (0..n_e) are all evaluated; beyond, a coarse scan and a fine one."""
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

def memory_lines(s: hrm.Setting, N, mu, r_w):
    """GPU and CPU bytes as lines in r_c: (gpu at r_c=0, gpu slope, cpu at r_c=0, cpu slope)."""
    m0 = hrm.memory_use(s, N, mu, r_w, 0.0)
    m1 = hrm.memory_use(s, N, mu, r_w, 1.0)
    g0, c0 = np.asarray(m0.gpu_bytes, float), np.asarray(m0.cpu_bytes, float)
    return g0, np.asarray(m1.gpu_bytes, float) - g0, c0, np.asarray(m1.cpu_bytes, float) - c0


def kv_for_budget(problem: Problem, placement: PlacementOption, g0, g_slope, c0, c_slope, num_micro_batches):
    """(r_c, feasible): the largest KV fraction the GPU budget allows, rounded down to what the runtime
    realises (whole micro-batches, hrm.policy.realised_kv_frac), or the placement's fixed fraction;
    feasible where both budgets hold."""
    G, C = problem.budgets.gpu_bytes, problem.budgets.cpu_bytes
    if placement.searches_kv:
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(g_slope > 0, (G - g0) / np.where(g_slope > 0, g_slope, 1.0), 1.0)
        r_c = realised_kv_frac(np.floor(np.clip(room, 0.0, 1.0) / KV_FRAC_STEP) * KV_FRAC_STEP, num_micro_batches)
    else:
        r_c = np.broadcast_to(realised_kv_frac(float(placement.kv_gpu_frac or 0.0), num_micro_batches),
                              np.broadcast(g0, g_slope).shape)
    gpu = g0 + r_c * g_slope
    cpu = c0 + r_c * c_slope
    ok = (gpu <= G * (1 + _REL_TOL)) & (cpu <= C * (1 + _REL_TOL))
    return r_c, ok


def fixed_experts(problem: Problem, placement: PlacementOption) -> int | None:
    """The whole-expert count a placement fixes (the realisation Policy.resident_experts uses), if any."""
    if placement.weights_gpu_frac is None:
        return None
    return int(problem.num_experts * placement.weights_gpu_frac + 1e-9)


def _expert_candidates(problem: Problem, placement: PlacementOption) -> np.ndarray:
    e_fixed = fixed_experts(problem, placement)
    if e_fixed is not None:
        return np.array([e_fixed])
    return np.arange(problem.num_experts + 1)


# ---------------------------------------------------------------------------------------------------
# hrm's terms as affine functions of (r_w, r_c)

_CORNER_W = np.array([0.0, 1.0, 0.0])[:, None]
_CORNER_C = np.array([0.0, 0.0, 1.0])[:, None]


@dataclass(frozen=True)
class Affine:
    """A per-pair quantity a + b * r_w + c * r_c (arrays of shape [pair])."""
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray

    @classmethod
    def of(cls, corners, P: int) -> "Affine":
        """From values at the corners (0, 0), (1, 0), (0, 1), stacked on axis 0."""
        v = np.broadcast_to(np.asarray(corners, float), (3, P))
        return cls(v[0], v[1] - v[0], v[2] - v[0])

    def __post_init__(self):
        object.__setattr__(self, "_uses", (bool(np.any(self.b)), bool(np.any(self.c))))

    @property
    def constant(self) -> bool:
        return not any(self._uses)

    def at(self, r_w, r_c):
        out = self.a
        if self._uses[0]:
            out = out + self.b * r_w
        if self._uses[1]:
            out = out + self.c * r_c
        return out


def _group(terms: tuple) -> tuple:
    """Terms whose max is wanted: the constant ones folded into one array, then the varying ones."""
    const = [t.a for t in terms if t.constant]
    varying = tuple(t for t in terms if not t.constant)
    return (hrm.max_of(const) if const else None), varying


def _max_of(group, r_w, r_c):
    const, varying = group
    values = ([const] if const is not None else []) + [t.at(r_w, r_c) for t in varying]
    return hrm.max_of(values)


@dataclass(frozen=True)
class PairTerms:
    """Everything needed to price any (r_w, r_c) for a set of (N, mu) pairs under one placement."""
    num_layers: int
    prefill_once_s: np.ndarray    # hrm.prefill_once_s
    prefill: tuple                # the prefill terms, grouped (_group)
    decode: tuple                 # per context sample: (weight, layer terms grouped, step at layer time 0, d step / d layer time)
    gpu_bytes: Affine
    cpu_bytes: Affine


def _columns(x, cols):
    """PairTerms (or any part of one) restricted to the pairs `cols`."""
    if isinstance(x, PairTerms):
        return PairTerms(x.num_layers, *(_columns(getattr(x, f), cols) for f in
                                         ("prefill_once_s", "prefill", "decode", "gpu_bytes", "cpu_bytes")))
    if isinstance(x, Affine):
        return Affine(x.a[cols], x.b[cols], x.c[cols])
    if isinstance(x, tuple):
        return tuple(_columns(v, cols) for v in x)
    if isinstance(x, np.ndarray) and x.ndim:
        return x[cols]
    return x


def _memory(s: hrm.Setting, N, mu) -> tuple[Affine, Affine]:
    m = hrm.memory_use(s, N, mu, _CORNER_W, _CORNER_C)
    return Affine.of(m.gpu_bytes, len(N)), Affine.of(m.cpu_bytes, len(N))


def pair_terms(s: hrm.Setting, N, mu) -> PairTerms:
    """hrm.estimate.pass_terms at the corners (r_w, r_c) = (0, 0), (1, 0), (0, 1), each term kept affine."""
    P = len(N)
    terms = hrm.pass_terms(s, N, mu, _CORNER_W, _CORNER_C)
    L, head = terms.num_layers, np.broadcast_to(np.asarray(terms.lm_head, float), (P,))
    pre = _group(tuple(Affine.of(v, P) for v in terms.prefill.values()))
    decode = []
    for w, layer_terms, lt in terms.decode:
        at0 = hrm.step_time(0.0, lt, L, head)            # step_time is affine in the layer time
        slope = np.broadcast_to(np.asarray(hrm.step_time(1.0, lt, L, head) - at0, float), (3, P))[0]
        decode.append((w, _group(tuple(Affine.of(v, P) for v in layer_terms.values())), Affine.of(at0, P), slope))
    gpu, cpu = _memory(s, N, mu)
    once = np.broadcast_to(np.asarray(terms.prefill_once, float), (P,))
    return PairTerms(L, once, pre, tuple(decode), gpu, cpu)


def price(pt: PairTerms, r_w, r_c):
    """(prefill_s, decode_s) of candidates (r_w, r_c) (arrays [candidate, pair] or broadcastable)."""
    prefill = pt.num_layers * _max_of(pt.prefill, r_w, r_c) + pt.prefill_once_s
    decode = 0.0
    for w, terms, at0, slope in pt.decode:
        decode = decode + w * (at0.at(r_w, r_c) + slope * _max_of(terms, r_w, r_c))
    return prefill, decode


# ---------------------------------------------------------------------------------------------------
# feasibility

def _candidates(problem: Problem, placement: PlacementOption, gpu: Affine, cpu: Affine, N, mu):
    es = _expert_candidates(problem, placement)
    r_w = (es / problem.num_experts)[:, None]
    r_c, ok = kv_for_budget(problem, placement, gpu.a + gpu.b * r_w, gpu.c, cpu.a + cpu.b * r_w, cpu.c,
                            -(-N // mu))
    return es, r_c, ok


def feasible_experts(problem: Problem, placement: PlacementOption, N, mu):
    """(e [K], r_c [K, P], feasible [K, P]) for every candidate expert count of every pair."""
    N, mu = np.atleast_1d(np.asarray(N, np.int64)), np.atleast_1d(np.asarray(mu, np.int64))
    return _candidates(problem, placement, *_memory(problem.setting(placement), N, mu), N, mu)


def feasible(problem: Problem, placement: PlacementOption, N, mu) -> np.ndarray:
    """Whether some expert count (and KV fraction) fits both budgets, per pair."""
    N, mu = np.atleast_1d(np.asarray(N, np.int64)), np.atleast_1d(np.asarray(mu, np.int64))
    if N.size == 0:
        return np.zeros(0, bool)
    _, _, ok = feasible_experts(problem, placement, N, mu)
    return ok.any(axis=0)


# ---------------------------------------------------------------------------------------------------
# the best inner choice per pair

def _evaluate(pt: PairTerms, E: int, e, r_c, ok):
    """Total seconds of candidates e [K, P] (inf where not ok)."""
    prefill, decode = price(pt, e / E, r_c)
    return np.where(ok, prefill + decode, np.inf)


def _pick(total, *arrays):
    k = np.argmin(total, axis=0)
    cols = np.arange(total.shape[1])
    return (total[k, cols],) + tuple(np.broadcast_to(a, total.shape)[k, cols] for a in arrays)


def best_per_pair(problem: Problem, placement: PlacementOption, N, mu) -> Choice:
    """For each (N, mu) pair: the expert count and KV fraction with the least prefill + decode time."""
    N = np.atleast_1d(np.asarray(N, np.int64))
    mu = np.atleast_1d(np.asarray(mu, np.int64))
    if N.size == 0:
        z = np.zeros(0)
        return Choice(N, mu, z.astype(np.int64), z, z, z.astype(bool))
    pt = pair_terms(problem.setting(placement), N, mu)
    es, r_c, ok = _candidates(problem, placement, pt.gpu_bytes, pt.cpu_bytes, N, mu)
    E = problem.num_experts
    if len(es) <= DENSE_EXPERTS:
        e_grid = np.broadcast_to(es[:, None], ok.shape)
        t, e, rc = _pick(_evaluate(pt, E, e_grid, r_c, ok), e_grid, r_c)
    else:
        t, e, rc = _coarse_then_fine(pt, E, r_c, ok)
    good = np.isfinite(t)
    return Choice(N, mu, np.where(good, e, 0).astype(np.int64), np.where(good, rc, 0.0), t, good)


def _coarse_then_fine(pt: PairTerms, E: int, r_c_all, ok_all):
    """Many experts (candidates are e = 0..E): scan about sqrt(2 E) expert counts over each pair's
    feasible range, then every count within one coarse step of the coarse best: exact where the time
    is convex in e, that is where r_c stays constant over the pair's feasible range (see the module
    docstring). r_c is realised per whole micro-batch, a step function of e, so pairs where it steps
    are scanned in full."""
    t, e, rc = _coarse_then_fine_convex(pt, E, r_c_all, ok_all)
    rc_ok = np.where(ok_all, r_c_all, np.nan)
    steps = np.nanmax(rc_ok, axis=0, initial=-np.inf) > np.nanmin(rc_ok, axis=0, initial=np.inf)
    if steps.any():
        cols = np.flatnonzero(steps)
        sub = _columns(pt, cols)
        K = ok_all.shape[0]
        e_grid = np.broadcast_to(np.arange(K)[:, None], (K, cols.size))
        t_all, e_all, rc_all = _pick(_evaluate(sub, E, e_grid, r_c_all[:, cols], ok_all[:, cols]), e_grid,
                                     r_c_all[:, cols])
        t, e, rc = t.copy(), e.copy(), rc.copy()
        t[cols], e[cols], rc[cols] = t_all, e_all, rc_all
    return t, e, rc


def _coarse_then_fine_convex(pt: PairTerms, E: int, r_c_all, ok_all):
    K, P = ok_all.shape
    cols = np.arange(P)
    any_ok = ok_all.any(axis=0)
    lo = np.where(any_ok, np.argmax(ok_all, axis=0), 0)
    hi = np.where(any_ok, K - 1 - np.argmax(ok_all[::-1], axis=0), 0)
    n = max(8, int(np.ceil(np.sqrt(2 * K))))         # coarse steps; the fine scan then covers +-1 step
    step = np.maximum(1, np.ceil((hi - lo) / n)).astype(np.int64)
    coarse = np.minimum(lo[None, :] + step[None, :] * np.arange(n + 1)[:, None], hi[None, :])
    total = _evaluate(pt, E, coarse, r_c_all[coarse, cols], ok_all[coarse, cols])
    _, e_best = _pick(total, coarse)
    fine = np.clip(e_best[None, :] + _offsets(step), lo[None, :], hi[None, :])
    total_f = _evaluate(pt, E, fine, r_c_all[fine, cols], ok_all[fine, cols])
    return _pick(total_f, fine, r_c_all[fine, cols])


def _offsets(step: np.ndarray) -> np.ndarray:
    """Offsets -step..step for each pair, padded by repeating 0 (shape [2 * max(step) + 1, P])."""
    m = int(step.max())
    off = np.arange(-m, m + 1)[:, None]
    return np.where(np.abs(off) <= step[None, :], off, 0)
