"""A peer's results as whole-model rows, and the HF peer's decode admission."""
import pytest

from benchmark_scripts import load_benchmark

PEER = {"benchmark": "peer_hf_accelerate", "date": "2026-12-03", "environment": {"cpu_memory_bytes": 10},
        "rows": [{"model": "m", "num_layers": 32, "full_layers": 32, "batch_size": 384, "gpu_budget_full_bytes": 24,
                  "experts_implementation": "eager", "status": "ok", "tokens_per_s": 23.0, "prefill_s": 2.0,
                  "wall_s": 12.0, "peak_gpu_bytes": 7},
                 {"model": "m", "num_layers": 32, "full_layers": 32, "batch_size": 512, "gpu_budget_full_bytes": 24,
                  "status": "oom", "error": "CUDA out of memory"}]}


def test_peer_rows_fill_the_whole_model_columns():
    pr = load_benchmark("peer_rows")
    ok, oom = pr.whole_model_rows(PEER, "x.json")
    assert set(ok) <= set(pr.COLUMNS) and ok["tag"] == "peer:hf-accelerate"
    assert ok["meas_tok_s"] == 23.0 and ok["meas_decode_s"] == 10.0 and ok["completed"] is True
    assert ok["policy"] == "N=384 experts=eager" and ok["expert_dtype"] == ok["kv_dtype"] == "bf16"
    assert "pred_tok_s" not in ok                       # a peer has no prediction
    assert oom["completed"] is False and oom["error"] == "oom: CUDA out of memory"


def test_peer_rows_refuses_other_results(tmp_path, capsys):
    pr = load_benchmark("peer_rows")
    f = tmp_path / "a.json"
    f.write_text('{"benchmark": "whole_model", "rows": []}')
    assert pr.main([str(f), "-o", str(tmp_path / "o.csv")]) == 2
    assert "not a peer's results" in capsys.readouterr().err and not (tmp_path / "o.csv").exists()


def test_decode_admitted_only_when_the_kv_growth_fits():
    pytest.importorskip("accelerate")
    hf = load_benchmark("peer_hf_accelerate")
    GiB = 2 ** 30
    mem = {"kv_bytes": 9 * GiB, "gpu_cap_bytes": 24 * GiB}       # prompt 256 + gen 32: growth 1 GiB + 1 layer
    assert hf.decode_shortfall(int(22.5 * GiB), mem, 256, 32, 32) == ""
    assert "decode KV growth" in hf.decode_shortfall(23 * GiB, mem, 256, 32, 32)
