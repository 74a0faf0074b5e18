"""The two solvers agree (MILP optimum == grid optimum on small spaces) and both price points exactly as
hrm.estimate.estimate() does (DESIGN.md: equations written once, every solver consumes them)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hrm import estimate as hrm
from hrm.hardware import load_profile
from hrm.hf_config import load_model
from hrm.policy import Placement, Policy
from hrm.spec import Workload
from optimizer import grid, milp
from optimizer.search import best_policy, make_problem, search
from optimizer.space import ALL_PLACEMENTS, DEFAULT_PLACEMENTS, Budgets, Pairs, PlacementOption, Problem
from oracles import bare_profile

MIXTRAL = load_model("mixtral-8x7b")
# A tiny Mixtral-shaped model (2 layers, 4 experts): small enough that the MILP solves every pair fast,
# with budgets that make the expert count and the KV fraction bind.
TINY = dataclasses.replace(MIXTRAL, name="tiny-moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=4,
                           moe_intermediate_size=128)
TINY_WL = Workload(20.0, 30, 8)
TINY_BUDGETS = Budgets(gpu_bytes=900e3, cpu_bytes=600e3)
SMALL_PAIRS = Pairs(batch_sizes=(1, 2, 3, 5, 8, 12, 17, 24, 31, 40), micro_batch_sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24))


def tiny_problem(hw="t4-s1") -> Problem:
    return Problem(TINY, bare_profile(hw), TINY_WL, TINY_BUDGETS)


@pytest.mark.parametrize("placement", ALL_PLACEMENTS, ids=lambda p: p.name)
def test_milp_equals_grid_per_pair(placement):
    """Every (N, mu) of a small space: the MILP's optimal time equals the grid's exhaustive optimum."""
    pb = tiny_problem()
    N, mu = SMALL_PAIRS.arrays()
    g = grid.best_per_pair(pb, placement, N, mu)
    m = milp.best_per_pair(pb, placement, N, mu)
    assert g.feasible.sum() > 10, "the space should have feasible pairs"
    assert not g.feasible.all(), "the budgets should exclude some pairs"
    np.testing.assert_array_equal(g.feasible, m.feasible)
    np.testing.assert_allclose(m.total_s[m.feasible], g.total_s[g.feasible], rtol=1e-9)


def test_tiny_space_exercises_the_choices():
    """The small space is not degenerate: optima use several expert counts and interior KV fractions."""
    pb = tiny_problem()
    N, mu = SMALL_PAIRS.arrays()
    cpu = grid.best_per_pair(pb, DEFAULT_PLACEMENTS[0], N, mu)
    gpu = grid.best_per_pair(pb, DEFAULT_PLACEMENTS[1], N, mu)
    assert len(np.unique(cpu.experts[cpu.feasible])) >= 3
    kv = gpu.kv_gpu_frac[gpu.feasible]
    assert ((kv > 0) & (kv < 1)).any()


@pytest.mark.parametrize("hw", ["t4-s1", "h200"])
def test_search_milp_equals_grid_on_small_space(hw):
    grid_plan = search(TINY, bare_profile(hw), TINY_WL, budgets=TINY_BUDGETS, pairs=SMALL_PAIRS, solver="grid")
    milp_plan = search(TINY, bare_profile(hw), TINY_WL, budgets=TINY_BUDGETS, pairs=SMALL_PAIRS, solver="milp")
    assert milp_plan.throughput_tok_s == pytest.approx(grid_plan.throughput_tok_s, rel=1e-9)


def test_grid_point_equals_estimate():
    """The grid's total time for a chosen point is estimate()'s prefill + decode for that policy."""
    pb = make_problem(MIXTRAL, load_profile("h200"), Workload(77.0, 418, 128))
    for placement in ALL_PLACEMENTS:
        found = best_policy(pb, (placement,))
        p = placement
        policy = Policy(found.batch_size, found.micro_batch_size, p.attention_on_gpu, p.ffn_on_gpu,
                        found.experts / MIXTRAL.num_experts, found.kv_gpu_frac, p.schedule)
        est = hrm.estimate(MIXTRAL, pb.hardware, pb.workload, policy)
        assert est.total_s == pytest.approx(found.total_s, rel=1e-12), placement.name
        assert est.memory.gpu_bytes <= pb.budgets.gpu_bytes and est.memory.cpu_bytes <= pb.budgets.cpu_bytes


def test_terms_linear_and_nonincreasing_in_kv_fraction():
    """What the solvers rely on: terms are linear in r_w and r_c, and more KV on the GPU never costs time."""
    s = hrm.Setting(MIXTRAL, load_profile("h200"), Workload(77.0, 418, 128), Placement(True, True, "s4"))
    N, mu = np.array([64, 300, 1000]), np.array([16, 64, 250])
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.uniform(0, 1, 2)
        lt = {k: hrm.decode_layer_times(s, N, mu, rw, rc, 300.0).terms("s4")
              for k, (rw, rc) in {"00": (0, 0), "10": (1, 0), "01": (0, 1), "ab": (a, b)}.items()}
        for name in lt["00"]:
            v00, v10, v01 = (np.asarray(lt[k][name], float) for k in ("00", "10", "01"))
            np.testing.assert_allclose(lt["ab"][name], v00 + a * (v10 - v00) + b * (v01 - v00), rtol=1e-9, atol=1e-15)
            assert np.all(v01 <= v00 + 1e-15), name
    pre0, pre1 = (hrm.pass_time(s, N, mu, 0.3, rc)[0] for rc in (0.0, 1.0))
    assert np.all(pre1 <= pre0)


def test_many_experts_coarse_then_fine_is_exact():
    """With more than DENSE_EXPERTS expert counts the grid scans coarse then fine; same optimum as all."""
    spec = dataclasses.replace(TINY, name="tiny-many", num_experts=96, num_experts_per_tok=4, moe_intermediate_size=32)
    pb = Problem(spec, bare_profile("t4-s1"), TINY_WL, Budgets(gpu_bytes=4.0e6, cpu_bytes=2.0e6))
    N, mu = SMALL_PAIRS.arrays()
    for placement in ALL_PLACEMENTS:
        fast = grid.best_per_pair(pb, placement, N, mu)
        es, r_c, ok = grid.feasible_experts(pb, placement, N, mu)
        prefill, decode = hrm.pass_time(pb.setting(placement), N, mu, (es / spec.num_experts)[:, None], r_c)
        total = np.where(ok, prefill + decode, np.inf)
        np.testing.assert_allclose(fast.total_s, total.min(axis=0), rtol=1e-12)
        assert len(np.unique(fast.experts[fast.feasible])) > 3


def test_affine_pricing_equals_direct_composition():
    """pair_terms/price (hrm at three corners, then a + b r_w + c r_c) == total_time (hrm directly)."""
    for hw, spec in (("h200", MIXTRAL), ("t4-s1", load_model("deepseek-v2-lite"))):
        wl = Workload(77.0, 418, 128)
        for placement in ALL_PLACEMENTS:
            s = placement.setting(spec, load_profile(hw), wl)
            N, mu = np.array([1, 7, 64, 500, 2000]), np.array([1, 3, 64, 64, 300])
            r_w = np.array([[0.0], [0.25], [1.0]])
            r_c = np.array([[0.0], [0.7], [0.3]])
            got = grid.price(grid.pair_terms(s, N, mu), r_w, r_c)
            want = hrm.pass_time(s, N, mu, r_w, r_c)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-10)


def test_baseline_restrictions_hold():
    """Fixed fractions and one micro-batch are honoured by the search."""
    pb = make_problem(MIXTRAL, load_profile("h200"), Workload(77.0, 418, 128))
    one = PlacementOption("one", Placement(True, True, "blocking"), weights_gpu_frac=0.0,
                    one_micro_batch=True)
    found = best_policy(pb, (one,))
    assert found.batch_size == found.micro_batch_size and found.experts == 0


def test_solve_takes_a_problem_value():
    """search() builds a Problem and solves it; solve() on that Problem gives the same plan."""
    from optimizer.search import solve
    spec, hw, wl = load_model("mixtral-8x7b"), load_profile("t4-s1"), Workload(77.0, 418, 128)
    by_search = search(spec, hw, wl)
    by_problem = solve(make_problem(spec, hw, wl))
    assert by_problem.policy == by_search.policy
    assert by_problem.estimate.throughput_tok_s == pytest.approx(by_search.estimate.throughput_tok_s)
