"""Tensor parallelism in the cost model (hrm/parallel.py): the memory of each rank's shard, the all-reduces."""
from dataclasses import replace

import pytest

from hrm import ops
from hrm.estimate import Setting, decode_layer_times, estimate, prefill_layer_times
from hrm.hardware import load_profile
from hrm.hf_config import load_model
from hrm.memory import PassShape, account
from hrm.parallel import ALLREDUCE_STEP_S, ParallelError, ring_allreduce_s, shard_spec
from hrm.policy import Policy
from hrm.spec import Workload

MIXTRAL = load_model("mixtral-8x7b")
WL = Workload(77, 418, 32)


def test_two_ranks_hold_two_shards_with_their_replicated_parts_each():
    """The account over 2 GPUs is 2 x one rank's: each holds half the heads and FFN widths, and all of the
    embeddings, norms, routers and LM head, its CUDA context and its process."""
    hw = load_profile("2xt4-s6")
    shape = PassShape.nominal(WL, 64, 32, 0.0)
    both = account(MIXTRAL, shape, 0.25, profile=hw.memory, num_gpus=2)
    one = account(shard_spec(MIXTRAL, 2), shape, 0.25, profile=hw.memory, num_gpus=1)
    assert both.gpu_bytes == pytest.approx(2 * one.gpu_bytes) and both.cpu_bytes == pytest.approx(2 * one.cpu_bytes)
    whole = account(MIXTRAL, shape, 0.25, profile=hw.memory, num_gpus=1)
    replicated = 2 * MIXTRAL.vocab_size * MIXTRAL.hidden_size * MIXTRAL.dtypes.weight_bytes   # embed + LM head
    assert both.gpu["non_expert_weights"] - whole.gpu["non_expert_weights"] > replicated
    assert both.gpu["resident_experts"] == pytest.approx(whole.gpu["resident_experts"])     # cut, not copied
    assert both.pinned["kv_cache"] == pytest.approx(whole.pinned["kv_cache"])


def test_each_layer_pays_two_ring_allreduces_of_its_hidden_states():
    """Decode and prefill layers on 2 GPUs pay 2 all-reduces of tokens x hidden per micro-batch on the GPU's
    path; one GPU pays none."""
    two, one = load_profile("2xt4-s6"), load_profile("t4-s1")
    p = Policy(64, 32, attention_on_gpu=False)
    s2 = Setting.of(MIXTRAL, two, WL, p)
    tokens = 32
    nbytes = tokens * MIXTRAL.hidden_size * MIXTRAL.dtypes.act_bytes
    want = 2 * ring_allreduce_s(nbytes, 2, two.link.h2d_bytes_per_s)
    assert want == pytest.approx(2 * 2 * (ALLREDUCE_STEP_S + nbytes / 2 / two.link.h2d_bytes_per_s))
    without = replace(two, link=replace(two.link, h2d_bytes_per_s=1e30))   # free link: the steps' fixed cost only
    d = float(decode_layer_times(s2, 64, 32, 0.0, 0.0, 100).gpu_s)
    d_free = float(decode_layer_times(Setting.of(MIXTRAL, without, WL, p), 64, 32, 0.0, 0.0, 100).gpu_s)
    assert d - d_free == pytest.approx(2 * (want - 2 * 2 * ALLREDUCE_STEP_S), rel=1e-6)     # two micro-batches
    assert ring_allreduce_s(nbytes, 1, 1e9) == 0.0
    pre2 = float(prefill_layer_times(s2, 64, 32, 0.0, 0.0).gpu_s)
    pre_free = float(prefill_layer_times(Setting.of(MIXTRAL, without, WL, p), 64, 32, 0.0, 0.0).gpu_s)
    assert pre2 > pre_free
    assert estimate(MIXTRAL, one, WL, p).throughput_tok_s > 0


def test_a_model_the_ranks_cannot_shard_says_why():
    with pytest.raises(ParallelError, match="attention 'mla'"):
        shard_spec(load_model("deepseek-v2-lite"), 2)
    assert shard_spec(MIXTRAL, 1) is MIXTRAL
    assert ops.attention(shard_spec(MIXTRAL, 2), 1, 1, 10).flops == pytest.approx(ops.attention(MIXTRAL, 1, 1, 10).flops / 2)

