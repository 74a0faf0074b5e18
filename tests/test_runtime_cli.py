"""`moe-lightning run` end to end on a tiny config: a plan written by the optimizer in, Measurement out."""
import json

import pytest

pytest.importorskip("torch")

from hrm.hardware import load_profile  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from moe_lightning_cli.main import main  # noqa: E402
from optimizer.search import search  # noqa: E402
from runtime.measure import Measurement  # noqa: E402

TINY = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50, "num_experts": 3, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "dtype": "float32"}


@pytest.fixture
def plan_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    plan = search(load_model(tmp_path / "config.json"), load_profile("h200"), Workload(6.0, 9, 4),
                  gpu_memory="1GiB")
    return plan.save(tmp_path / "plan.json"), plan


def test_run_plan_writes_measurement(plan_file, tmp_path, capsys):
    path, plan = plan_file
    out = tmp_path / "m.json"
    rc = main(["run", "--plan", str(path), "--synthetic", "--num-prompts", "5", "--json", "-o", str(out)])
    assert rc == 0
    m = Measurement.read(out)
    assert m.num_sequences == 5 and m.generated_tokens == 5 * plan.workload.gen_len
    assert m.policy == plan.policy.short()
    printed = json.loads(capsys.readouterr().out)
    assert printed["plan_id"] == m.plan_id and "predicted" in printed


def test_run_with_model_and_policy_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rc = main(["run", "--model", str(tmp_path / "config.json"), "--policy-json",
               '{"batch_size": 3, "micro_batch_size": 2, "schedule": "s3"}', "--gen-len", "3",
               "--prompt-len", "5", "--no-warmup", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["generated_tokens"] == 9


def test_run_without_plan_or_policy_is_a_one_line_error(capsys):
    assert main(["run", "--model", "mixtral-8x7b"]) == 2
    assert "give --plan, or --model with --policy-json" in capsys.readouterr().err


@pytest.mark.parametrize("size, expected", [("24GB", 24 * 10**9), ("1GiB", 2**30), ("1.5GiB", 3 * 2**29)])
def test_run_gpu_memory_is_read_as_written(plan_file, monkeypatch, capsys, size, expected):
    """One unit convention with plan's --gpu-memory: GB = 1e9 bytes, GiB = 2^30."""
    import runtime.engine
    seen = []

    class Recording(runtime.engine.Engine):
        def __init__(self, *a, **kw):
            seen.append(kw["gpu_memory_budget_bytes"])
            super().__init__(*a, **kw)
    monkeypatch.setattr(runtime.engine, "Engine", Recording)
    path, _ = plan_file
    assert main(["run", "--plan", str(path), "--synthetic", "--num-prompts", "2", "--no-warmup", "--json",
                 "--gpu-memory", size]) == 0
    assert seen == [expected]


def test_run_gpu_memory_without_a_unit_is_a_one_line_error(plan_file, capsys):
    path, _ = plan_file
    assert main(["run", "--plan", str(path), "--synthetic", "--gpu-memory", "24 bananas"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read memory size" in err


def test_run_prices_the_passes_it_runs(tmp_path, capsys):
    """7 prompts under N=3: passes of 3, 3 and 1, each priced at its own size; the prediction is their sum."""
    from hrm.estimate import estimate
    from hrm.policy import Policy
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    policy = {"batch_size": 3, "micro_batch_size": 2, "schedule": "s3"}
    assert main(["run", "--model", str(tmp_path / "config.json"), "--policy-json", json.dumps(policy),
                 "--gen-len", "3", "--prompt-len", "5", "--num-prompts", "7", "--hardware", "t4-s1", "--no-warmup",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    passes = printed["predicted"]["passes"]
    assert [p["policy"]["batch_size"] for p in passes] == [3, 3, 1]
    last = estimate(load_model(tmp_path / "config.json"), load_profile("t4-s1"), Workload.uniform(5, 3),
                    Policy(1, 1, schedule="s3"))
    assert passes[2]["prefill_s"] == pytest.approx(last.prefill_s)
    assert printed["predicted"]["decode_s"] == pytest.approx(sum(p["decode_s"] for p in passes))


def test_run_prints_each_phase_with_its_wall_time(plan_file, capsys):
    path, _ = plan_file
    assert main(["run", "--plan", str(path), "--synthetic", "--num-prompts", "3", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert "by phase (measured)" in out
    table = out.split("by phase (measured)", 1)[1]
    rows = [ln for ln in table.splitlines() if ln.strip("│ ").split(" ")[0] in ("load", "reserve", "prefill", "decode")]
    assert [r.strip("│ ").split(" ")[0] for r in rows] == ["load", "prefill", "decode"]   # no reserve: no warm-up
    assert all(" s " in r or "ms" in r or "us" in r for r in rows)


@pytest.mark.parametrize("via", ["plan", "--hardware"])
def test_run_refuses_a_profile_of_several_gpus_in_one_line(tmp_path, capsys, via):
    """A 2-GPU plan's budget is both GPUs' together: run refuses it (and a 2-GPU --hardware) rather than
    running it on one GPU, before anything is loaded."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    hw = "2xt4-s6" if via == "plan" else "h200"
    plan = search(load_model(tmp_path / "config.json"), load_profile(hw), Workload(6.0, 9, 4), gpu_memory="1GiB")
    path = plan.save(tmp_path / "plan.json")
    extra = ["--hardware", "2xt4-s6"] if via == "--hardware" else []
    assert main(["run", "--plan", str(path), "--synthetic", "--num-prompts", "2", *extra]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 2 GPUs, this run 1 rank" in err[0] and "torchrun --nproc-per-node 2" in err[0]


def test_the_engine_refuses_a_plan_of_several_gpus(tmp_path):
    from runtime.engine import Engine, UnsupportedPolicy
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    plan = search(load_model(tmp_path / "config.json"), load_profile("4xt4-s7"), Workload(6.0, 9, 4), gpu_memory="1GiB")
    with pytest.raises(UnsupportedPolicy, match="has 4 GPUs"):
        Engine(plan)
