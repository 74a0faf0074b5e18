"""benchmarks/attention_in_pipeline.py: the KV bytes a run's decode attention read, by hand arithmetic."""
import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks/results/whole_model/h200-2026-12-04-call42"


def _module():
    return load_benchmark("attention_in_pipeline")


def test_gb_per_s_is_the_kv_of_every_decode_step_over_the_attention_timer():
    mod = _module()
    meas_path = RUN / "keep/mixtral/mixtral-8x7b-48GB-1-chosen.measurement.json"
    row = mod.row_of(RUN, meas_path)
    meas = json.loads(meas_path.read_text())
    # Mixtral: 8 kv heads x 128, K and V, bf16: 4,096 bytes per token and layer; step i reads the prompt's
    # 256 and the i decoded entries, plus the one it adds, and writes that one
    n, steps, layers = 1752, 31, 32
    kv = n * sum(256 + i + 2 for i in range(steps)) * 4096 * layers
    seconds = next(s["total_s"] for s in meas["stages"] if s["phase"] == "decode" and s["name"] == "cpu_attention")
    assert row["layer_steps"] == steps * layers and row["kv_format"] == "bfloat16"
    assert row["kv_read_gb_per_s"] == pytest.approx(kv / seconds / 1e9, rel=1e-9)
    assert row["share_of_dram_read"] == pytest.approx(row["kv_read_gb_per_s"] / 82.5, rel=1e-9)


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    mod = _module()
    with pytest.raises(SystemExit, match="no run with CPU attention"):
        mod.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a folder"):
        mod.main([str(tmp_path / "missing")])
