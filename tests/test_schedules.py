"""Schedules are values: the HRM's registry and the runtime's decode loops name the same schedules, and a
new schedule, registered from this one file, is priced by the HRM and run by the runtime."""
import pytest

torch = pytest.importorskip("torch")

from hrm import efficiency  # noqa: E402
from hrm.estimate import estimate  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.policy import Policy, PolicyError  # noqa: E402
from hrm.schedules import SCHEDULES, Schedule  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from oracles import QWEN2  # noqa: E402
from runtime import decode  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.model import greedy_generate  # noqa: E402
from runtime.weights import WeightStore  # noqa: E402
from runtime.synthetic import synthesize  # noqa: E402

torch.set_num_threads(1)
PROMPTS = [[5, 9, 33, 2, 71], [8, 1, 90], [4, 4, 4, 4], [60, 61]]
MAX_NEW = 5


def test_the_hrm_and_the_runtime_name_the_same_schedules():
    assert set(SCHEDULES) == set(decode.DECODE_LOOPS)


def _serial_terms(lt) -> dict:
    """Nothing overlaps within a layer: the sum of every resource's time."""
    return {"serial": lt.gpu_s + lt.cpu_s + lt.h2d_s + lt.d2h_s}


def _serial_loop(pipe) -> None:
    """Each (visit, micro-batch) front to back, the next layer's pages loaded at its first micro-batch."""
    for visit in range(pipe.L, pipe.num_visits):
        for j in range(pipe.n):
            pipe.front(visit, j)
            pipe.back(visit, j, pipe.store.page_table.pages if j == 0 else ())


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(SCHEDULES, "toy-serial", Schedule("toy-serial", "every stage in series", (False,),
                                                          _serial_terms))
    monkeypatch.setitem(decode.DECODE_LOOPS, "toy-serial", _serial_loop)


def test_a_toy_schedule_is_priced_and_run(toy):
    policy = Policy(4, 2, weights_gpu_frac=0.4, schedule="toy-serial")
    hw, wl = load_profile("t4-s1"), Workload.uniform(5, MAX_NEW)
    with efficiency.without("h200-runtime"):     # the toy's terms hold no per-visit host work; S3's would
        toy_est = estimate(QWEN2, hw, wl, policy)
        s3_est = estimate(QWEN2, hw, wl, Policy(4, 2, weights_gpu_frac=0.4, schedule="s3"))
    assert 0 < s3_est.decode_s <= toy_est.decode_s                # in series: no faster than S3
    with Engine(QWEN2, policy, dtype=torch.float64, seed=3, progress=False) as eng:
        tokens, _ = eng.generate(PROMPTS, MAX_NEW)
    store = WeightStore(QWEN2, torch.float64, "cpu", num_resident=0)
    synthesize(store, seed=3, progress=False)
    for prompt, got in zip(PROMPTS, tokens):
        assert got == greedy_generate(prompt, MAX_NEW, store.dense, store.at_rest, QWEN2)


def test_a_schedule_refuses_the_attention_it_does_not_run(toy):
    with pytest.raises(PolicyError, match="'toy-serial' runs attention on the CPU"):
        Policy(4, 2, attention_on_gpu=True, schedule="toy-serial")
