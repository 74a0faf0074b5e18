"""`moe-lightning run` end to end on a tiny config: plan file in, Measurement JSON out."""
import json

import pytest

pytest.importorskip("torch")

from moe_lightning_cli.main import main  # noqa: E402
from runtime.measure import Measurement  # noqa: E402

TINY = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50, "num_experts": 3, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "dtype": "float32"}


def test_run_plan_writes_measurement(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    plan = {"model": str(tmp_path / "config.json"), "plan_id": "tiny-plan",
            "policy": {"batch_size": 5, "micro_batch_size": 2, "weights_gpu_frac": 0.34}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "m.json"
    rc = main(["run", "--plan", str(tmp_path / "plan.json"), "--synthetic", "--prompt-len", "6",
               "--max-prompt-len", "9", "--gen-len", "4", "--json", "-o", str(out)])
    assert rc == 0
    m = Measurement.read(out)
    assert m.plan_id == "tiny-plan" and m.num_sequences == 5 and m.generated_tokens == 20
    assert json.loads(capsys.readouterr().out)["plan_id"] == "tiny-plan"


def test_run_without_plan_or_policy_is_a_one_line_error(capsys):
    assert main(["run", "--model", "mixtral-8x7b"]) == 2
    assert "give --plan, or --model with --policy-json" in capsys.readouterr().err
