"""benchmarks/whole_model.py: its rows, and a time limit that never starts a job it cannot finish."""
import csv
import json
import sys
from pathlib import Path

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_benchmark("whole_model")


def _fake_measurement(plan):
    est = plan.estimate
    return {"derived": {"tokens_per_s": est.throughput_tok_s}, "prefill_s": est.prefill_s, "decode_s": est.decode_s,
            "gpu_peak_bytes": 1.0, "cpu_peak_bytes": 2.0, "setup_s": 0.1,
            "memory_phases": [{"phase": "load", "pinned_bytes": 3.0, "gpu_allocated_peak_bytes": 4.0, "gpu_reserved_peak_bytes": 4.5, "wall_s": 7.5},
                              {"phase": "decode", "pinned_bytes": 3.0, "gpu_allocated_peak_bytes": 4.0, "gpu_reserved_peak_bytes": 5.0, "wall_s": 1.0}]}


def test_rows_in_the_schema_and_the_time_limit_starts_no_job_it_cannot_finish(tmp_path, monkeypatch):
    mod = _module()
    ran = []

    def fake_run(plan, keep, name, timeout):
        ran.append((name, timeout))
        return _fake_measurement(plan), "", 5.0

    monkeypatch.setattr(mod, "run_one", fake_run)
    out = tmp_path / "runs.csv"
    common = ["--model", "mixtral-8x7b", "--hardware", "h200-measured", "--gpu-memory", "24GB", "48GB",
              "--cpu-memory", "120GiB", "--out", str(out), "--keep", str(tmp_path / "keep")]
    assert mod.main(common) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["tag"] for r in rows] == ["chosen", "chosen"] and all(r["completed"] == "True" for r in rows)
    assert set(mod.COLUMNS) <= set(rows[0])
    assert float(rows[0]["load_s"]) == 7.5 and float(rows[0]["reserve_s"]) == 0.0
    # each job is predicted to take its prefill + decode + SETUP_S (well over 10 s): none starts
    ran.clear()
    assert mod.main(common + ["--time-limit-s", "10"]) == 0
    assert ran == [] and len(list(csv.DictReader(out.open()))) == 2


def test_result_files_carry_the_command_date_and_machine(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from result_file import write_result

    out = tmp_path / "r.json"
    got = write_result(out, "x.py", ["--a", "1"], rows=[1, 2])
    assert json.loads(out.read_text()) == got
    assert got["command"] == "x.py --a 1" and got["rows"] == [1, 2] and {"date", "host", "device"} <= set(got)
    assert write_result(None, "x.py", []) and not (tmp_path / "None").exists()
