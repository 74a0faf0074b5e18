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
from oracles import bare_profile_file  # noqa: E402

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
    assert validate.main(["--model", str(cfg), "--hardware", bare_profile_file("h200", tmp_path), "--gpu-budget", "4MB", "--prompt-len", "16",
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
    validate.main(["--model", str(cfg), "--hardware", bare_profile_file("h200", tmp_path), "--gpu-budget", "4MB", "--prompt-len", "16",
                   "--gen-len", "2", "--max-policies", "3", "--skip", "2", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["tag"] for r in rows] == ["baseline:deepspeed"]


def test_reprice_recomputes_predictions_and_keeps_measurements(tmp_path):
    """summarize_validation.py --reprice: every prediction column comes from the HRM under the given
    profile, for the run's own model, layers and workload (read from its command line); the measured
    columns stay as they were."""
    import summarize_validation
    from hrm.estimate import estimate
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from hrm.policy import Policy
    from hrm.spec import Workload

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "v.csv"
    validate.main(["--model", str(cfg), "--hardware", bare_profile_file("h200", tmp_path), "--gpu-budget", "4MB", "--prompt-len", "16",
                   "--gen-len", "2", "--max-policies", "2", "--out", str(out)])
    before = list(csv.DictReader(out.open()))
    rows = tmp_path / "rows.csv"
    assert summarize_validation.main([str(out), "--reprice", "t4-s1", "--rows", str(rows),
                                      "-o", str(tmp_path / "s.json")]) == 0
    after = list(csv.DictReader(rows.open()))
    assert len(after) == len(before) == 2
    hw, spec, wl = load_profile("t4-s1"), load_model(str(cfg)), Workload.uniform(16, 2)
    for b, a in zip(before, after):
        assert a["meas_tok_s"] == b["meas_tok_s"] and a["sweep"] == "v.csv"
        p = Policy(batch_size=int(a["policy_batch_size"]), micro_batch_size=int(a["policy_micro_batch_size"]),
                   weights_gpu_frac=float(a["policy_weights_gpu_frac"]), kv_gpu_frac=float(a["policy_kv_gpu_frac"]),
                   attention_on_gpu=a["policy_attention_on_gpu"] == "True", ffn_on_gpu=a["policy_ffn_on_gpu"] == "True",
                   schedule=a["policy_schedule"])
        pred = estimate(spec, hw, wl, p).throughput_tok_s
        assert float(a["pred_tok_s"]) == pytest.approx(pred, rel=1e-9)
        assert float(a["err_tok_s"]) == pytest.approx((pred - float(a["meas_tok_s"])) / float(a["meas_tok_s"]))
    summary = json.loads((tmp_path / "s.json").read_text())["runs"][0]
    assert summary["repriced_with"].endswith("t4-s1.toml") or summary["repriced_with"] == "t4-s1"


def test_profile_visit_splits_the_probe_visit(tmp_path):
    """benchmarks/profile_visit.py runs the decode-visit probe's setting as the probe does and under the
    profiler, and writes per-visit waits of the main thread (on the CPU: the attention worker's futures)."""
    import profile_visit

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "visit.json"
    assert profile_visit.main(["--model", str(cfg), "--schedules", "cgopipe", "--visits", "8",
                               "--micro-batches", "2", "--layers", "1,2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["schedule"], r["layers"], r["visits"]) for r in results] == [("cgopipe", 1, 8), ("cgopipe", 2, 8)]
    r = results[0]
    assert r["visit_ms"] > 0 and r["profiled_visit_ms"] > 0
    waits = r["main_thread_waits_per_visit"]
    assert waits["future result"]["calls"] >= 1                 # each visit waits for its CPU attention
    assert r["main_thread_busiest_self_ms_per_visit"][0]["ms"] > 0
    assert (tmp_path / "visit_cgopipe_1l.trace.json.gz").stat().st_size > 0
    assert profile_visit.main(["--model", str(cfg), "--schedules", "s5", "--out", str(out)]) == 2
    assert profile_visit.main(["--model", str(cfg), "--layers", "0", "--out", str(out)]) == 2


def test_peers_are_named_by_their_script():
    """A DeepSpeed peer gets its own ratio and column, not HF accelerate's."""
    import summarize_validation as sv
    assert sv.peer_name({"benchmark": "peer_deepspeed"}) == "deepspeed"
    assert sv.peer_name({"benchmark": "peer_hf_accelerate"}) == "hf_accelerate"
    row = dict(file="x.csv", gpu_budget_full_model_gb=24 * 2**30 / 1e9, policies_run=3, median_abs_err_tok_s=0.05,
               max_abs_err_tok_s=0.1, chosen_vs_best_measured=1.0, pipeline_efficiency_chosen=0.9,
               ratios={"hf_accelerate_b16": 342.0, "deepspeed_b192": 7.5, "baseline:deepspeed": 2.1})
    last = sv.markdown([row]).splitlines()[-1]
    assert last.endswith("| 342.00x | 7.50x | - |"), last
