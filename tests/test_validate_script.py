"""benchmarks/validate.py end to end on the CPU with a tiny Mixtral: the sweep runs, and the CSV, its
JSON sidecar and the plot are written (the numbers themselves only mean something on a GPU)."""
import csv
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate  # noqa: E402

TINY = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False}


@pytest.mark.slow
def test_validate_sweep_writes_rows_sidecar_and_plot(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "v.csv"
    assert validate.main(["--model", str(cfg), "--hardware", "h200", "--gpu-budget", "4MB", "--prompt-len", "16",
                          "--gen-len", "4", "--max-policies", "3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and rows[0]["tag"] == "chosen"
    for r in rows:
        assert float(r["meas_tok_s"]) > 0 and float(r["meas_visit_s"]) > 0 and float(r["pred_tok_s"]) > 0
        assert r["err_tok_s"] and r["pipeline_efficiency"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert "validate.py" in meta["command"] and meta["policies_skipped"] == 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_skip_runs_the_sweep_from_a_policy(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "v.csv"
    validate.main(["--model", str(cfg), "--hardware", "h200", "--gpu-budget", "4MB", "--prompt-len", "16",
                   "--gen-len", "2", "--max-policies", "3", "--skip", "2", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["tag"] for r in rows] == ["baseline:deepspeed"]
