"""`moe-lightning profile --only cpu-attention --base OLD.toml -o NEW.toml`: only the CPU decode attention's
figures re-measured, every other line of the base kept byte for byte.

The measurements are stubbed with fixed numbers (fast, deterministic); one test runs the real quick probe
and checks properties only.
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch

from hrm.hardware import load_profile
from hrm.profile_keys import PROFILE_KEYS
from moe_lightning_cli.main import main
from runtime.probe import (CPU_ATTENTION_KEYS, CPU_ATTENTION_LOOP_KEYS, ProbeError, profile_cpu_attention,
                           profile_toml, read_profile_text, update_cpu_attention, write_cpu_attention_update)
from runtime.probe import machine_profile as mp
from runtime.probe.profile_toml import cpu_attention_lines

REPO = Path(__file__).resolve().parent.parent
H200 = REPO / "hrm" / "hardware_profiles" / "h200-measured.toml"
FORMAT_KEY = "cpu_attention_time_of_compute_by_kv_format"
LOOP_FORMAT_KEY = "cpu_attention_loop_time_of_compute_by_kv_format"


def _with_every_attention_key(text: str) -> str:
    """The committed profile's text, with a by-format line after the by-shape one and an in-loop by-format
    line after the loop calls where it has none (profiles measured before 2026-12-03 and 2026-12-04 lack
    them), so that every CPU_ATTENTION_KEYS key is there to be replaced."""
    for key, anchor in ((FORMAT_KEY, "\ncpu_attention_gb_per_s_by_shape = "),
                        (LOOP_FORMAT_KEY, "\ncpu_attention_loop_call_ms = ")):
        if f"\n{key} = " not in text:
            i = text.index("\n", text.index(anchor) + 1)
            text = text[:i] + f"\n{key} = {{ int8 = 0.9, fp8 = 1.9 }}" + text[i:]
    return text


BASE_TEXT = _with_every_attention_key(H200.read_text())

SHAPES = [[8, 256], [32, 1024]]
RATES = [51.5e9, 47.25e9]
CALL_S = 123.4e-6
LOOP = {"cpu_attention_overlapped_bytes_per_s": 21.5e9, "overlap_shape": [32, 512], "overlap_calls": 64,
        "loop_shape": [32, 516.5, 4096.0], "loop_call_s": 3.1e-3, "overlap_decode_visit_s": 2e-3,
        "cpu_attention_overlapped_micro_batches": [32, 256, 1024],
        "cpu_attention_overlapped_bytes_per_s_by_micro_batch": [21.5e9, 33.25e9, 29.5e9],
        "cpu_attention_loop_shapes": [[32, 516.5, 4096.0], [256, 516.5, 4096.0], [1024, 260.5, 4096.0]],
        "cpu_attention_loop_call_s": [3.1e-3, 15.5e-3, 30.25e-3],
        LOOP_FORMAT_KEY: {"int8": 0.875, "fp8": 1.25}}
NEW = {"cpu_attention_gb_per_s": 49.38, "cpu_attention_shapes": SHAPES, "cpu_attention_gb_per_s_by_shape": [51.5, 47.25],
       FORMAT_KEY: {"int8": 0.625, "fp8": 1.5}, "cpu_attention_call_us": 123.4, "cpu_attention_overlapped_gb_per_s": 21.5,
       "cpu_attention_overlapped_micro_batches": [32, 256, 1024],
       "cpu_attention_overlapped_gb_per_s_by_micro_batch": [21.5, 33.25, 29.5],
       "cpu_attention_loop_shapes": LOOP["cpu_attention_loop_shapes"], "cpu_attention_loop_call_ms": [3.1, 15.5, 30.25],
       LOOP_FORMAT_KEY: {"int8": 0.875, "fp8": 1.25}}
"""The values the stubbed measurements must leave in the profile, in its units."""


@pytest.fixture
def stubbed(monkeypatch):
    """The three measurements return fixed numbers; `calls` records what ran."""
    calls = []

    def rates(shapes, *a, **k):
        calls.append("kernel")
        assert [list(s) for s in shapes] in (SHAPES, [list(s) for s in mp.ATTENTION_SHAPES_QUICK])
        return list(RATES)

    monkeypatch.setattr(mp, "ATTENTION_SHAPES", [tuple(s) for s in SHAPES])
    monkeypatch.setattr(mp, "cpu_attention_bytes_per_s", rates)
    monkeypatch.setattr(mp, "cpu_attention_time_of_compute",
                        lambda formats, *a: (calls.append("formats"), {"int8": 0.625, "fp8": 1.5})[1])
    monkeypatch.setattr(mp, "cpu_attention_call_s", lambda spec, *a: (calls.append("call"), CALL_S)[1])
    monkeypatch.setattr(mp, "attention_in_pipeline_by_micro_batch",
                        lambda spec, quick=False: (calls.append("loop"), dict(LOOP))[1])
    return calls


@pytest.fixture
def gpu(monkeypatch):
    """torch believes there is a GPU (the stubbed measurements need none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)


def _base(tmp_path: Path, text: str | None = None, name: str = "h200-measured.toml") -> Path:
    path = tmp_path / "base" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(BASE_TEXT.encode() if text is None else text.encode())
    return path


def _diff(old: str, new: str) -> dict[int, tuple[str, str]]:
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    assert len(a) == len(b)
    return {i: (x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y}


def _key(line: str) -> str:
    return line.split("=", 1)[0].strip()


def test_the_key_set_is_the_attention_part_of_calibration():
    assert len(set(CPU_ATTENTION_KEYS)) == len(CPU_ATTENTION_KEYS)
    assert set(CPU_ATTENTION_KEYS) <= PROFILE_KEYS["calibration"]
    assert set(CPU_ATTENTION_LOOP_KEYS) < set(CPU_ATTENTION_KEYS)
    assert all(k.startswith("cpu_attention_") for k in CPU_ATTENTION_KEYS)
    assert not any(k.startswith("decode_visit") or k == "grouped_above_tokens" for k in CPU_ATTENTION_KEYS)
    # every cpu_attention_* key a profile may hold is one of them
    assert {k for keys in PROFILE_KEYS.values() for k in keys if k.startswith("cpu_attention")} == set(CPU_ATTENTION_KEYS)


def test_with_a_gpu_only_the_attention_lines_and_the_method_change(tmp_path, stubbed, gpu):
    base = _base(tmp_path)
    result = profile_cpu_attention(quick=False, progress=False)
    assert stubbed == ["kernel", "formats", "call", "loop"]
    out = tmp_path / "h200-measured.toml"                       # the same stem: the name stays
    profile, changes = write_cpu_attention_update(result, read_profile_text(base), out)
    assert changes == {"replaced": list(CPU_ATTENTION_KEYS), "added": [], "removed": [], "kept": []}
    old_text, new_text = BASE_TEXT, out.read_text()
    diff = _diff(old_text, new_text)
    assert sorted(_key(x) for x, _ in diff.values()) == sorted([*CPU_ATTENTION_KEYS, "method"])
    assert all(_key(x) == _key(y) for x, y in diff.values())                  # each in its place
    old, new = tomllib.loads(old_text), tomllib.loads(new_text)
    assert new["calibration"] == {**old["calibration"], **NEW}
    assert {k: v for k, v in new.items() if k not in ("calibration", "measured")} == \
        {k: v for k, v in old.items() if k not in ("calibration", "measured")}
    note = "; CPU attention re-measured "                        # one note: an earlier one is replaced
    assert new["measured"]["method"].startswith(old["measured"]["method"].split(note)[0] + note)
    assert new["measured"]["method"].count(note) == 1
    assert {k: v for k, v in new["measured"].items() if k != "method"} == \
        {k: v for k, v in old["measured"].items() if k != "method"}
    loaded = load_profile(out)
    assert loaded == profile and loaded.name == "h200-measured"
    m = loaded.measured
    assert m.cpu_attention_bytes_per_s == pytest.approx(49.38e9)
    assert m.cpu_attention_call_s == pytest.approx(CALL_S)
    assert m.cpu_attention_overlapped_by_micro_batch == pytest.approx((21.5e9, 33.25e9, 29.5e9))
    assert m.cpu_attention_loop_call_s == pytest.approx((3.1e-3, 15.5e-3, 30.25e-3))
    assert m.decode_visit_s == load_profile(H200).measured.decode_visit_s
    assert base.read_bytes() == BASE_TEXT.encode()                              # the base untouched
    assert sorted(os.listdir(tmp_path)) == ["base", "h200-measured.toml"]      # no temporary file left


def test_the_new_lines_are_the_full_profiles_own(tmp_path, stubbed, gpu):
    """Rendered by profile_toml's renderer: each line is the line a whole profile of the same figures holds."""
    result = profile_cpu_attention(progress=False)
    full = dict(result, gpu=None, link=None)
    full["cpu"] = dict(result["cpu"], name="cpu", cores=4, torch_threads=4, memory_bytes=2**34, dram_size_bytes=2**30,
                       dram_copy_bytes_per_s=1e10, dram_read_bytes_per_s=1e10, matmul_n={"fp32": 64, "bf16": 64},
                       matmul_flops_per_s={"fp32": 1e11, "bf16": 1e11})
    full["cpu"]["runtime"] = dict(result["cpu"]["runtime"], decode_visit_s=1e-3, visit_model="m")
    text = profile_toml(full, "x", gpu_from="h200")
    lines = cpu_attention_lines(result)
    assert set(lines) == set(CPU_ATTENTION_KEYS)
    assert all(line in text.splitlines() for line in lines.values())


def test_without_a_gpu_the_loop_keys_stay(tmp_path, stubbed, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = profile_cpu_attention(progress=False)
    assert stubbed == ["kernel", "formats", "call"] and any("not measured" in n for n in result["notes"])
    new, changes = update_cpu_attention(BASE_TEXT, result)
    assert changes["kept"] == list(CPU_ATTENTION_LOOP_KEYS) and not changes["removed"]
    diff = _diff(BASE_TEXT, new)
    assert sorted(_key(x) for x, _ in diff.values()) == sorted(
        [k for k in CPU_ATTENTION_KEYS if k not in CPU_ATTENTION_LOOP_KEYS] + ["method"])


def test_a_quick_loop_drops_the_stale_curves_and_missing_keys_are_added(tmp_path, stubbed, gpu, monkeypatch):
    one = {k: v for k, v in LOOP.items() if not k.startswith("cpu_attention_loop")}
    one.update(cpu_attention_overlapped_micro_batches=[32], cpu_attention_overlapped_bytes_per_s_by_micro_batch=[21.5e9])
    monkeypatch.setattr(mp, "attention_in_pipeline_by_micro_batch", lambda spec, quick=False: dict(one))
    text = "".join(line for line in BASE_TEXT.splitlines(keepends=True)
                   if not line.startswith("cpu_attention_call_us"))
    new, changes = update_cpu_attention(text, profile_cpu_attention(quick=True, progress=False))
    assert changes["added"] == ["cpu_attention_call_us"]
    assert changes["removed"] == ["cpu_attention_overlapped_micro_batches", "cpu_attention_overlapped_gb_per_s_by_micro_batch",
                                  "cpu_attention_loop_shapes", "cpu_attention_loop_call_ms", LOOP_FORMAT_KEY]
    cal = tomllib.loads(new)["calibration"]
    assert cal["cpu_attention_call_us"] == 123.4 and cal["cpu_attention_overlapped_gb_per_s"] == 21.5
    assert not set(changes["removed"]) & set(cal)
    kept = [line for line in text.splitlines() if _key(line) not in CPU_ATTENTION_KEYS and _key(line) != "method"]
    assert kept == [line for line in new.splitlines() if _key(line) not in CPU_ATTENTION_KEYS and _key(line) != "method"]
    path = tmp_path / "q.toml"
    path.write_text(new)
    assert load_profile(path).measured.cpu_attention_loop_shapes == ()


def test_a_second_update_replaces_the_note_and_keeps_line_endings(stubbed):
    result = profile_cpu_attention(progress=False, gpu=False)
    crlf = BASE_TEXT.replace("\n", "\r\n")
    once, _ = update_cpu_attention(crlf, result)
    twice, _ = update_cpu_attention(once, dict(result, date="2099-01-01"))
    method = tomllib.loads(twice)["measured"]["method"]
    assert method.count("re-measured") == 1 and "2099-01-01" in method
    assert twice.count("\r\n") == crlf.count("\r\n") and "\n" not in twice.replace("\r\n", "")


def test_the_real_quick_probe_on_this_cpu():
    r = profile_cpu_attention(quick=True, progress=False, gpu=False)
    assert r["cpu"]["attention_kv_bytes_per_s"] > 1e6 and 0 < r["cpu"]["runtime"]["cpu_attention_call_s"] < 1
    assert set(cpu_attention_lines(r)) == set(CPU_ATTENTION_KEYS) - set(CPU_ATTENTION_LOOP_KEYS)
    json.dumps(r)


def test_cli_writes_new_from_base(tmp_path, stubbed, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, out = _base(tmp_path), tmp_path / "new.toml"
    assert main(["profile", "--only", "cpu-attention", "--base", str(base), "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "decode attention batch 8 x ctx 256" in text and "not measured" in text and f"wrote {out}" in text
    p = load_profile(out)
    assert p.name == "new" and p.measured.cpu_attention_call_s == pytest.approx(CALL_S)
    assert p.measured.cpu_attention_loop_call_s == load_profile(H200).measured.cpu_attention_loop_call_s
    assert base.read_bytes() == BASE_TEXT.encode()

    assert main(["profile", "--only", "cpu-attention", "--base", "h200-measured", "-o", str(out), "--name", "x",
                 "--quick", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["profile_path"] == str(out) and d["changes"]["kept"] == list(CPU_ATTENTION_LOOP_KEYS)
    assert load_profile(out).name == "x"


BAD = [
    (["--only", "cpu-attention", "-o", "{out}"], "needs --base"),
    (["--base", "{base}", "-o", "{out}"], "--base goes with --only"),
    (["--only", "cpu-attention", "--base", "{base}"], "needs -o"),
    (["--only", "gpu", "--base", "{base}", "-o", "{out}"], "invalid choice: 'gpu'"),
    (["--only", "cpu-attention", "--base", "{base}", "-o", "{out}", "--upgrade", "{base}"], "--upgrade"),
    (["--only", "cpu-attention", "--base", "{base}", "-o", "{out}", "--gpu-from", "h200"], "--gpu-from"),
    (["--only", "cpu-attention", "--base", "{tmp}/nope.toml", "-o", "{out}"], "not found"),
    (["--only", "cpu-attention", "--base", "{tmp}/garbage.toml", "-o", "{out}"], "not valid TOML"),
    (["--only", "cpu-attention", "--base", "h100", "-o", "{out}"], "no [measured] and [calibration]"),
    (["--only", "cpu-attention", "--base", "l4-s2", "-o", "{out}"], "published"),
    (["--only", "cpu-attention", "--base", "{base}", "-o", "{out}", "--model", "olmoe-1b-7b"], "model_shapes"),
    (["--only", "cpu-attention", "--base", "{base}", "-o", "{tmp}"], "Is a directory"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[b[1] for b in BAD])
def test_cli_refuses_bad_input_in_one_line_before_measuring(tmp_path, stubbed, capsys, argv, needle):
    base = _base(tmp_path)
    (tmp_path / "garbage.toml").write_text("name = [\n")
    before = sorted(os.listdir(tmp_path))
    fill = {"base": str(base), "out": str(tmp_path / "new.toml"), "tmp": str(tmp_path)}
    assert main(["profile", *(a.format(**fill) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert stubbed == [] and sorted(os.listdir(tmp_path)) == before
    assert base.read_bytes() == BASE_TEXT.encode()


def test_a_failed_measurement_writes_nothing(tmp_path, stubbed, capsys, monkeypatch):
    def fail(*a, **k):
        raise ProbeError("the kernel broke")
    monkeypatch.setattr(mp, "cpu_attention_call_s", fail)
    base = _base(tmp_path)
    assert main(["profile", "--only", "cpu-attention", "--base", str(base), "-o", str(base), "--no-progress"]) == 2
    assert "the kernel broke" in capsys.readouterr().err
    assert base.read_bytes() == BASE_TEXT.encode() and os.listdir(base.parent) == [base.name]
