"""Property: whatever the model, machine and workload, the chosen plan never exceeds a budget (or the
search says in one line why nothing fits); budgets and sizes parse as documented."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrm.hardware import available_profiles, load_profile
from hrm.units import GiB
from hrm.memory import GPU_HEADROOM_FRAC, HOST_HEADROOM_FRAC
from hrm.hf_config import builtin_models, load_model
from hrm.spec import Workload
from optimizer.space import Budgets, SearchError, int_grid
from hrm.units import SizeError, format_size, parse_size
from optimizer.search import search


@st.composite
def requests(draw):
    model = draw(st.sampled_from(builtin_models()))
    profile = draw(st.sampled_from(available_profiles()))
    max_len = draw(st.integers(1, 4096))
    avg = draw(st.floats(1.0, float(max_len)))
    gen = draw(st.integers(1, 512))
    padded = draw(st.booleans())
    gpu = draw(st.one_of(st.none(), st.sampled_from(["8GiB", "16GiB", "24GB", "40GiB", "80GB"])))
    cpu = draw(st.one_of(st.none(), st.sampled_from(["64GiB", "200GB", "512GiB"])))
    return model, profile, Workload(avg, max_len, gen, padded), gpu, cpu


@settings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_plan_within_budgets(req):
    model, profile, workload, gpu, cpu = req
    spec, hw = load_model(model), load_profile(profile)
    try:
        plan = search(spec, hw, workload, gpu_memory=gpu, cpu_memory=cpu)
    except SearchError as e:
        msg = str(e)
        assert msg and "\n" not in msg and ("short by" in msg or "fits" in msg)
        return
    b = Budgets.from_hardware(hw, gpu_memory=gpu, cpu_memory=cpu)
    assert plan.budgets == b
    mem = plan.estimate.memory
    assert mem.gpu_bytes <= b.gpu_bytes and mem.cpu_bytes <= b.cpu_bytes
    assert plan.memory.within_budgets
    assert mem.pinned_bytes <= mem.cpu_bytes
    assert plan.throughput_tok_s > 0 and 1 <= plan.policy.micro_batch_size <= plan.policy.batch_size
    k = plan.policy.kv_gpu_frac * plan.policy.num_micro_batches      # whole micro-batches: what the runtime keeps
    assert k == pytest.approx(round(k), abs=1e-6)


@pytest.mark.parametrize("text,value", [("16GiB", 16 * GiB), ("24GB", 24e9), ("500MB", 5e8), ("1.5TiB", 1.5 * 2 ** 40),
                                        ("100 gb", 1e11), ("64G", 64 * GiB), ("1024", 1024.0), (2e9, 2e9)])
def test_parse_size(text, value):
    assert parse_size(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-4GB", "0", "nan"])
def test_parse_size_rejects(text):
    with pytest.raises(SizeError):
        parse_size(text)


def test_budgets_default_and_override():
    hw = load_profile("2xt4-s6")
    b = Budgets.from_hardware(hw)
    assert b.gpu_total_bytes == pytest.approx(2 * hw.gpu.memory_bytes)      # the default: all of it
    assert b.cpu_total_bytes == pytest.approx(0.9 * hw.cpu.memory_bytes)    # not this machine's profile
    assert b.gpu_bytes == pytest.approx((1 - GPU_HEADROOM_FRAC) * b.gpu_total_bytes)   # what the search may fill
    assert b.cpu_bytes == pytest.approx((1 - HOST_HEADROOM_FRAC) * b.cpu_total_bytes)
    o = Budgets.from_hardware(hw, gpu_memory="8GiB", cpu_memory="100GB")
    assert o.gpu_total_bytes == 2 * 8 * GiB and o.cpu_total_bytes == 100e9   # per GPU x count: the totals
    assert "user" in o.gpu_source and format_size(o.cpu_total_bytes) == "93.13 GiB"


def test_int_grid():
    g = int_grid(1000, 24, 1.1)
    assert list(g[:24]) == list(range(1, 25)) and g[-1] == 1000 and (g[1:] > g[:-1]).all()
    assert (g[25:] / g[24:-1]).max() < 1.12
    assert list(int_grid(5, 24, 1.1)) == [1, 2, 3, 4, 5]
