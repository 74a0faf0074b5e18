"""The memory account (hrm.memory) against what the runtime allocates, part by part; the check before
allocating, per level, names the part that does not fit; measured peaks per phase are reported."""
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from hrm.hardware import load_profile  # noqa: E402
from hrm.memory import MemoryProfile, PassShape, account  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from runtime import engine as engine_module  # noqa: E402
from runtime.engine import DoesNotFit, Engine  # noqa: E402
from runtime.memory import Machine  # noqa: E402
from oracles import QWEN2  # noqa: E402

torch.set_num_threads(1)

MIXED = (5, 9, 3, 7, 12, 4, 8, 11, 2)
MAX_NEW = 4
# parts the runtime holds as tensors for the whole pass (the rest are the stack's, or transient)
HELD = {"gpu": ("non_expert_weights", "resident_experts", "expert_double_buffer", "expert_dequant", "kv_cache",
                "kv_stream_buffer", "pass_state", "prefill_inputs"),
        "pinned": ("offloaded_experts", "kv_cache", "prefill_staging", "io_buffers", "kv_transfer"),
        "pageable": ("pass_state",)}
POLICIES = [Policy(9, 2), Policy(9, 3, weights_gpu_frac=0.4, kv_gpu_frac=0.4), Policy(9, 9, weights_gpu_frac=1.0),
            Policy(9, 4, attention_on_gpu=True, schedule="s4"),
            Policy(9, 2, attention_on_gpu=True, schedule="blocking", kv_gpu_frac=0.5)]


def _prompts(lens=MIXED):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, QWEN2.vocab_size, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("policy", POLICIES, ids=[p.short() for p in POLICIES])
def test_account_equals_what_the_runtime_allocates(policy, padded):
    with Engine(QWEN2, policy, dtype=torch.float32, seed=0, progress=False) as eng:
        _, m = eng.generate(_prompts(), MAX_NEW, padded=padded)
    acc, held = m.account_bytes, m.allocated_bytes
    for level, parts in HELD.items():
        for part in parts:
            want, got = acc[level][part], held[level].get(part, 0)
            assert got == pytest.approx(want, rel=0.01, abs=1), f"{level}.{part}: runtime {got}, account {want}"


def test_nominal_shape_equals_the_runtime_layout_for_uniform_prompts():
    """The planner's account of a workload is the runtime's account of that workload's pass (micro-batches
    of equal size; r_c = 2 of 5 micro-batches)."""
    policy = Policy(10, 2, weights_gpu_frac=0.4, kv_gpu_frac=0.4)
    with Engine(QWEN2, policy, dtype=torch.bfloat16, seed=0, progress=False) as eng:
        _, m = eng.generate(_prompts((6,) * 10), MAX_NEW)
        planned = eng.account(PassShape.nominal(Workload.uniform(6, MAX_NEW), 10, 2, 0.4))
    for level, parts in HELD.items():
        for part in parts:
            assert planned.levels()[level][part] == pytest.approx(m.account_bytes[level][part], rel=1e-9), part


def _machine(gpu, host, cuda=True):
    return Machine(int(gpu), int(host), MemoryProfile(1e6, 2e6, 0.0, True, "test"), cuda=cuda)


class _Plan:
    """What Engine reads of a plan: the model, the policy, the workload and the hardware."""
    def __init__(self, spec, policy, workload):
        self.spec, self.policy, self.workload = spec, policy, workload
        self.hardware = load_profile("t4-s1")


@pytest.mark.parametrize("level,part", [("gpu", "resident_experts"), ("gpu", "kv_cache"),
                                        ("pinned", "offloaded_experts"), ("pinned", "kv_cache"),
                                        ("pageable", "process_baseline")])
def test_one_part_short_is_refused_before_allocating(monkeypatch, level, part):
    """With the machine one part short on a level, the engine refuses before the weight store (its first
    large allocation) exists, and names that part."""
    policy = Policy(9, 3, weights_gpu_frac=0.4, kv_gpu_frac=0.4)
    workload = Workload.uniform(6, MAX_NEW)
    shape = PassShape.nominal(workload, 9, 3, 1 / 3)
    acc = account(QWEN2, shape, 0.4, profile=MemoryProfile(1e6, 2e6, 0.0))
    order = list(acc.gpu) if level == "gpu" else list(acc.pinned) + list(acc.pageable)
    values = acc.gpu if level == "gpu" else acc.host
    before = sum(values[p] for p in order[:order.index(part) + 1])
    assert values[part] > 0
    short = before - values[part] / 2          # everything before it fits, not all of it
    gpu, host = (short, 1e12) if level == "gpu" else (1e12, short)

    def no_store(*a, **k):
        raise AssertionError("allocated the weights before checking the account")
    monkeypatch.setattr(engine_module, "WeightStore", no_store)
    with pytest.raises(DoesNotFit, match=rf"^the plan: {'GPU' if level == 'gpu' else 'host'} memory needs .* {part} "
                                         rf"\([\d.,]+ (?:[KMGT]i)?B\) does not fit$"):
        Engine(_Plan(QWEN2, policy, workload), dtype=torch.bfloat16, progress=False, machine=_machine(gpu, host))


def test_a_pass_that_does_not_fit_is_refused_before_its_buffers():
    """The weights fit; the KV cache of a pass of long prompts does not: refused before the host KV buffer."""
    policy = Policy(9, 3)
    with Engine(QWEN2, policy, dtype=torch.float32, progress=False, machine=_machine(1e12, 1e12, cuda=False)) as eng:
        need = eng._pass_account(*eng._layout(_prompts((6,) * 9), MAX_NEW, False), MAX_NEW)
        parts = list(need.gpu.values()) + list(need.pinned.values())     # the CPU: every part on the host
        through_kv = sum(parts[:len(need.gpu) + list(need.pinned).index("kv_cache") + 1])
        eng.machine = replace(eng.machine, host_bytes=int(through_kv - need.pinned["kv_cache"] / 2))
        with pytest.raises(DoesNotFit, match=r"^the pass: host memory needs .* kv_cache \([\d.,]+ (?:[KMGT]i)?B\) does not fit$"):
            eng.generate(_prompts((6,) * 9), MAX_NEW)
        assert eng.kv.host_bytes == 0


def test_phases_are_measured():
    with Engine(QWEN2, Policy(9, 3), dtype=torch.float32, progress=False) as eng:
        eng.warm_up(_prompts(), MAX_NEW)
        _, m = eng.generate(_prompts(), MAX_NEW)
    assert [p["phase"] for p in m.memory_phases] == ["load", "reserve", "prefill", "decode"]
    assert all(p["host_rss_peak_bytes"] > 0 for p in m.memory_phases)
    assert m.cpu_peak_bytes == max(p["host_rss_peak_bytes"] for p in m.memory_phases)


def _host_fit(eng, prompts, padded: bool, host_bytes: int) -> int:
    """The most of `prompts` (a prefix) whose pass the engine's check lets through on `host_bytes`."""
    from runtime.memory import check
    machine = replace(eng.machine, host_bytes=host_bytes)
    lo, hi = 0, len(prompts)
    while lo < hi:
        n = (lo + hi + 1) // 2
        try:
            check(eng._pass_account(*eng._layout(prompts[:n], MAX_NEW, padded), MAX_NEW), machine, "the pass")
            lo = n
        except DoesNotFit:
            hi = n - 1
    return lo


def test_packed_prompts_fit_more_sequences_than_padded_by_their_token_ratio():
    """Packed, every sequence holds its own prompt's KV slots (in blocks within KV_BLOCK_RATIO), so under
    one host budget a mix of long and short prompts fits about padded/real times more sequences."""
    from hrm.policy import KV_BLOCK_RATIO
    lens = (40, 4, 4, 4) * 1000
    prompts = _prompts(lens)
    new = MAX_NEW - 1
    ratio = (max(lens) + new) / (sum(lens) / len(lens) + new)             # padded / real slots: 2.69
    with Engine(QWEN2, Policy(len(lens), 50), dtype=torch.float32, progress=False,
                machine=_machine(1e12, 1e12, cuda=False)) as eng:
        # beyond one full micro-batch (its workspace and staging), the budget holds KV and per-sequence state
        first = eng._pass_account(*eng._layout(prompts[:50], MAX_NEW, True), MAX_NEW)
        budget = int(first.gpu_bytes + first.cpu_bytes + 30e6)         # no CUDA: every level is host memory
        padded, packed = _host_fit(eng, prompts, True, budget), _host_fit(eng, prompts, False, budget)
        assert 50 < padded < packed < len(prompts)
        assert packed / padded >= ratio / KV_BLOCK_RATIO, (packed, padded, ratio)
        mbs, _ = eng._layout(prompts[:packed], MAX_NEW, False)
        own = sum(n + new for mb in mbs for n in mb.prompt_lens)
        assert own <= sum(mb.kv_slots for mb in mbs) <= KV_BLOCK_RATIO * own


def test_nominal_packed_shape_bounds_the_runtime_layout():
    """The planner's packed account (average prompt, blocks within KV_BLOCK_RATIO) holds the runtime's
    layout of such a pass, and is below the padded one."""
    lens = (40, 4, 4, 4) * 10
    with Engine(QWEN2, Policy(40, 8), dtype=torch.float32, progress=False,
                machine=_machine(1e12, 1e12, cuda=False)) as eng:
        real = eng._pass_account(*eng._layout(_prompts(lens), MAX_NEW, False), MAX_NEW)
        packed = eng.account(PassShape.nominal(Workload.from_prompt_lens(lens, MAX_NEW), 40, 8, 0.0))
        padded = eng.account(PassShape.nominal(Workload.from_prompt_lens(lens, MAX_NEW, padded=True), 40, 8, 0.0))
    assert real.pinned["kv_cache"] <= packed.pinned["kv_cache"] < padded.pinned["kv_cache"] / 2


def test_the_runtime_sets_its_allocator_default_only_where_the_environment_names_none(monkeypatch):
    """Expandable segments by default (the slack between prefill's and decode's workspaces); a user's
    PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF wins, and the measurement reports which one ran."""
    import torch

    from runtime import measure
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    for name in measure.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    measure.configure_allocator()
    assert calls == [measure.DEFAULT_ALLOCATOR]
    assert measure.allocator_conf() == f"runtime default {measure.DEFAULT_ALLOCATOR}"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    measure.configure_allocator()
    assert calls == [measure.DEFAULT_ALLOCATOR]
    assert measure.allocator_conf() == "PYTORCH_ALLOC_CONF=expandable_segments:False"


def test_huge_page_advice_covers_the_whole_2mib_pages_of_a_buffer():
    """MOE_LIGHTNING_HOST_HUGEPAGES=1's advice: accepted by Linux for a buffer holding a 2 MiB page, nothing to
    advise in a buffer smaller than one."""
    import sys
    from runtime.host_memory import advise_hugepages
    big, small = torch.empty(8 * 2**20, dtype=torch.uint8), torch.empty(4096, dtype=torch.uint8)
    assert advise_hugepages(big.data_ptr(), big.numel()) is sys.platform.startswith("linux")
    assert advise_hugepages(small.data_ptr(), small.numel()) is False
