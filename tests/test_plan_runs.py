"""What the optimizer emits, the runtime runs: a searched plan executes end to end (CPU, tiny model)."""
from dataclasses import replace

import pytest

from hrm.hf_config import load_model
from hrm.spec import Workload
from optimizer.search import search
from optimizer.space import DEFAULT_PLACEMENTS
from oracles import bare_profile

TINY = replace(load_model("mixtral-8x7b"), name="tiny-mixtral", hidden_size=64, moe_intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)


def test_default_placements_are_executable():
    assert DEFAULT_PLACEMENTS and all(p.ffn_on_gpu for p in DEFAULT_PLACEMENTS)


@pytest.mark.parametrize("gpu_memory", ["760KiB", "3MiB"])  # CPU attention (cgopipe), GPU attention (s4)
def test_searched_plan_runs_in_the_runtime(gpu_memory):
    from runtime.engine import Engine

    workload = Workload.uniform(6, 3)
    plan = search(TINY, bare_profile("t4-s1"), workload, gpu_memory=gpu_memory, cpu_memory="8MiB")
    assert plan.memory.gpu_bytes <= plan.budgets.gpu_bytes
    prompts = [[1 + (i * 7 + j) % 100 for j in range(6)] for i in range(plan.policy.batch_size)]
    with Engine(plan, seed=0, progress=False, dtype="float32") as eng:
        tokens, m = eng.generate(prompts, workload.gen_len)
    assert len(tokens) == plan.policy.batch_size and all(len(t) == 3 for t in tokens)
    assert m.generated_tokens == 3 * plan.policy.batch_size
