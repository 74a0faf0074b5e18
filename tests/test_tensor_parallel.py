"""Tensor parallelism on the CPU (gloo): a model cut over 2 ranks by heads and FFN widths generates the tokens
the one-rank runtime does, launched through torchrun (runtime/parallel.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from oracles import hf_tiny_model  # noqa: E402

from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.parallel import ParallelError, Shard, shard_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[3, 17, 99, 42, 0, 7, 64, 5], [8, 1, 90], [4, 4, 61, 30, 9, 2]]
GEN = 6
EVEN_HEADS = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12)     # 2 of each per rank


def _torchrun(tmp_path, ranks: int, model_dir: str, policy: dict, env: dict | None = None) -> list:
    out = tmp_path / "tokens"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(ROOT / "tests" / "tp_worker.py"), model_dir, json.dumps(policy), json.dumps(PROMPTS), str(GEN), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                             **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    every = [json.loads(Path(f"{out}.{k}").read_text()) for k in range(ranks)]
    assert all(t == every[0] for t in every), "the ranks generated different tokens"
    return every[0]


def _one_rank(spec, policy: dict, model_dir=None) -> list:
    with Engine(spec, Policy(**policy), model_dir=model_dir, dtype=torch.float32, progress=False) as engine:
        return engine.generate(PROMPTS, GEN)[0]


@pytest.mark.parametrize("family, policy", [
    ("mixtral", {"batch_size": 3, "micro_batch_size": 2, "weights_gpu_frac": 0.5}),           # CGOPipe, CPU attention
    ("qwen2_moe", {"batch_size": 3, "micro_batch_size": 3, "attention_on_gpu": True, "schedule": "s4"}),
    ("qwen3_moe", {"batch_size": 3, "micro_batch_size": 1, "schedule": "s3"}),
    ("gpt_oss", {"batch_size": 3, "micro_batch_size": 3}),
    ("glm4_moe", {"batch_size": 3, "micro_batch_size": 2}),
])
def test_two_ranks_generate_the_one_rank_tokens(tmp_path, family, policy):
    """A real-format checkpoint (shared expert with its gate and qkv biases in Qwen2-MoE, q/k norms in Qwen3,
    gpt-oss's sinks, windows and expert biases, GLM's leading dense layer, partial rotary and grouped routing)
    read whole by each rank and cut: the same greedy tokens as one rank, on every rank."""
    head_dim = {"qwen3_moe": 16, "glm4_moe": 16, "gpt_oss": 8}.get(family, EVEN_HEADS["head_dim"])
    overrides = dict(EVEN_HEADS, head_dim=head_dim)
    hf_tiny_model(family, **overrides).save_pretrained(tmp_path)
    want = _one_rank(load_model(tmp_path), policy, tmp_path)
    assert _torchrun(tmp_path, 2, str(tmp_path), policy) == want


def test_synthetic_shards_are_the_one_rank_model_cut(tmp_path):
    """Synthetic weights are drawn at the whole model's shapes and cut: 2 ranks generate the tokens of the
    one-rank synthetic model."""
    spec = load_model("mixtral-8x7b")
    policy = {"batch_size": 3, "micro_batch_size": 3}
    tiny = "tiny-tp"
    (tmp_path / tiny).mkdir()
    config = {"model_type": "mixtral", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128, "num_local_experts": 4,
              "num_experts_per_tok": 2, "intermediate_size": 24, "max_position_embeddings": 64}
    (tmp_path / tiny / "config.json").write_text(json.dumps(config))
    spec = load_model(tmp_path / tiny)
    want = _one_rank(spec, policy)
    assert _torchrun(tmp_path, 2, "-", policy, env={"TP_MODEL": str(tmp_path / tiny)}) == want


def test_a_shard_holds_its_heads_and_its_slice_of_each_ffn():
    spec = load_model("qwen1.5-moe-a2.7b")
    half = shard_spec(spec, 2)
    assert (half.num_attention_heads, half.num_key_value_heads, half.moe_intermediate_size,
            half.shared_expert_intermediate_size) == (8, 8, 704, 2816)
    assert half.hidden_size == spec.hidden_size and half.vocab_size == spec.vocab_size
    w = torch.arange(24.0).view(4, 6)
    zero, one = Shard(spec, 0, 2), Shard(spec, 1, 2)
    assert torch.equal(one.cut("layers.0.q_proj", w), w[2:])                   # by heads: rows
    assert torch.equal(one.cut("layers.0.experts.3.down", w), w[:, 3:])        # the summed projections: columns
    assert torch.equal(one.cut("layers.0.shared.gate", w), w[2:])
    assert torch.equal(one.cut("layers.0.router", w), w)                       # replicated
    assert torch.equal(zero.cut("layers.0.o_bias", w), w) and not one.cut("layers.0.o_bias", w).any()


@pytest.mark.parametrize("name, ranks, words", [
    ("deepseek-v2-lite", 2, "attention 'mla'"),
    ("olmoe-1b-7b", 2, "q/k norms over the full width"),
    ("mixtral-8x7b", 3, "32 query / 8 KV heads over 3 ranks"),
])
def test_what_a_shard_cannot_hold_is_refused_naming_it(name, ranks, words):
    with pytest.raises(ParallelError, match="tensor parallelism over") as e:
        shard_spec(load_model(name), ranks)
    assert words in str(e.value)


def test_run_under_torchrun_runs_a_two_gpu_plan_on_two_ranks(tmp_path):
    """`moe-lightning run` launched by torchrun with as many ranks as the plan has GPUs: each rank its shard
    (gloo here), rank 0 alone prints and writes the measurement."""
    from hrm.hardware import load_profile
    from hrm.spec import Workload
    from optimizer.search import search
    from runtime.measure import Measurement

    hf_tiny_model("mixtral", **EVEN_HEADS).save_pretrained(tmp_path)
    plan = search(load_model(tmp_path), load_profile("2xt4-s6"), Workload(6.0, 9, 4), gpu_memory="1GiB")
    plan.save(tmp_path / "plan.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "moe_lightning_cli.main", "run", "--plan", str(tmp_path / "plan.json"), "--model-dir", str(tmp_path),
           "--num-prompts", "3", "--json", "-o", str(tmp_path / "m.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout)                                  # one JSON document: rank 0's
    m = Measurement.read(tmp_path / "m.json")
    assert m.num_sequences == 3 and m.generated_tokens == 3 * plan.workload.gen_len == printed["generated_tokens"]


def test_each_rank_attends_with_its_share_of_the_hosts_cores(monkeypatch):
    from runtime import cpu_attention

    monkeypatch.setattr(cpu_attention.os, "cpu_count", lambda: 16)
    reserved = cpu_attention.HOST_CORES_RESERVED
    assert cpu_attention.attention_threads(True, ranks=2) == 8 - reserved
    assert cpu_attention.attention_threads(True, ranks=4) == 4 - reserved
    assert cpu_attention.attention_threads(False, ranks=2) is None


def test_a_one_gpu_plan_on_two_ranks_is_refused_in_one_line(tmp_path):
    from hrm.hardware import load_profile
    from hrm.spec import Workload
    from optimizer.search import search

    hf_tiny_model("mixtral", **EVEN_HEADS).save_pretrained(tmp_path)
    search(load_model(tmp_path), load_profile("h200"), Workload(6.0, 9, 4), gpu_memory="1GiB").save(tmp_path / "plan.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "moe_lightning_cli.main", "run", "--plan", str(tmp_path / "plan.json"), "--model-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "has 1 GPU, this run 2 ranks (one GPU each): run it without torchrun, or plan for 2" in r.stderr
