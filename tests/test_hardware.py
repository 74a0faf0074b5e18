"""Hardware profiles: every shipped TOML loads, carries sources, converts units once; bad input fails loudly."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from hrm import hardware
from hrm.hardware import HardwareError, load_profile
from hrm.units import GB, GiB, TFLOPS

SHIPPED = ["t4-s1", "l4-s2", "t4-paper", "l4-paper", "2xt4-s6", "4xt4-s7",
           "a10g", "rtx4090", "a100-40gb", "a100-80gb", "h100", "h200"]


def test_every_shipped_profile_is_listed():
    names = hardware.available_profiles()
    for name in SHIPPED:
        assert name in names


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_with_sources(name):
    p = load_profile(name)
    assert p.name == name
    assert p.description.strip()
    for section in (p.gpu, p.cpu, p.link):
        assert section.source.strip(), f"{name}: a section has no source"
    for unit in (p.gpu, p.cpu):
        assert unit.name.strip()
        assert unit.memory_bytes > 0 and unit.mem_bytes_per_s > 0
        assert unit.peak_flops and all(v > 0 for v in unit.peak_flops.values())
        # every dtype the runtime uses resolves (directly or by fallback)
        for dtype in ("bfloat16", "float16", "float32"):
            assert unit.flops_per_s(dtype) > 0
    assert p.gpu.count >= 1 and p.cpu.cores >= 1
    lk = p.link
    assert lk.h2d_bytes_per_s > 0 and lk.d2h_bytes_per_s > 0
    assert 0 < lk.duplex_bytes_per_s <= lk.h2d_bytes_per_s + lk.d2h_bytes_per_s
    # Sanity: numbers are in SI, not left in GB/s or TFLOP/s (converted exactly once).
    assert 1 * GB < p.gpu.memory_bytes < 1000 * GB
    assert 100 * GB <= p.gpu.mem_bytes_per_s < 10_000 * GB
    assert 1 * TFLOPS < max(p.gpu.peak_flops.values()) < 10_000 * TFLOPS
    assert 10 * GB <= p.cpu.memory_bytes < 10_000 * GB
    assert 1 * GB < lk.h2d_bytes_per_s < 200 * GB


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_toml_sections_have_source_strings(name):
    data = tomllib.loads((hardware.PROFILE_DIR / f"{name}.toml").read_text())
    for section in ("gpu", "cpu", "link"):
        assert isinstance(data[section]["source"], str) and data[section]["source"].strip()


def test_t4_paper_units_converted_once():
    p = load_profile("t4-paper")
    assert p.link.h2d_bytes_per_s == pytest.approx(16e9)
    assert p.link.d2h_bytes_per_s == pytest.approx(16e9)
    assert p.link.duplex_bytes_per_s == pytest.approx(32e9)
    assert p.link.duplex_frac == pytest.approx(1.0)
    assert p.gpu.memory_bytes == pytest.approx(15e9)
    assert p.gpu.mem_bytes_per_s == pytest.approx(300e9)
    assert p.gpu.flops_per_s("float16") == pytest.approx(65e12)
    assert p.cpu.flops_per_s("float32") == pytest.approx(0.8e12)
    assert p.cpu.mem_bytes_per_s == pytest.approx(100e9)
    assert p.cpu.memory_bytes == pytest.approx(192e9)
    assert p.measured is None


def test_l4_paper_artifact_constants():
    p = load_profile("l4-paper")
    assert p.gpu.memory_bytes == pytest.approx(24e9)
    assert p.gpu.mem_bytes_per_s == pytest.approx(285e9)
    assert p.gpu.flops_per_s("bfloat16") == pytest.approx(104e12)
    assert p.cpu.flops_per_s("bfloat16") == pytest.approx(1.6e12)
    assert p.link.h2d_bytes_per_s == pytest.approx(16e9)
    assert p.cpu.memory_bytes == pytest.approx(192e9)


def test_t4_has_no_bf16_and_falls_back_to_fp16():
    p = load_profile("t4-s1")
    assert "bf16" not in p.gpu.peak_flops
    assert p.gpu.flops_per_s("bfloat16") == pytest.approx(65e12)
    assert p.gpu.flops_per_s("float32") == pytest.approx(8.1e12)
    assert p.link.duplex_frac < 1.0


def test_multi_gpu_profiles_are_per_gpu():
    for name, n in (("2xt4-s6", 2), ("4xt4-s7", 4)):
        p = load_profile(name)
        assert p.gpu.count == n
        assert p.gpu.memory_bytes == pytest.approx(16e9)     # per GPU, not the total
        assert p.cpu.memory_bytes == pytest.approx(416e9)
        assert p.cpu.cores == 32


def test_h200_profile_and_measured_section():
    p = load_profile("h200")
    assert p.gpu.memory_bytes == pytest.approx(139.8 * GiB)
    assert p.gpu.mem_bytes_per_s == pytest.approx(4100e9)
    assert p.gpu.flops_per_s("bfloat16") == pytest.approx(748e12)
    assert p.cpu.cores == 16
    assert p.cpu.memory_bytes == pytest.approx(125.9 * GiB)
    assert p.cpu.mem_bytes_per_s == pytest.approx(88e9)
    assert p.cpu.flops_per_s("bfloat16") == pytest.approx(3.7e12)
    assert p.cpu.flops_per_s("float32") == pytest.approx(1.4e12)
    assert p.link.h2d_bytes_per_s == pytest.approx(55.0e9)
    assert p.link.d2h_bytes_per_s == pytest.approx(55.2e9)
    assert p.link.duplex_bytes_per_s == pytest.approx(99e9)
    assert p.link.pageable_h2d_bytes_per_s == pytest.approx(14e9)
    m = p.measured
    assert m is not None and m.date == "2026-11-28" and "FACTS.md" in m.method
    assert m.gpu_gemm_tokens == (16, 64, 256, 1024, 4096)
    assert m.gemm_flops_per_s(256, default=0.0) == pytest.approx(404e12)
    assert m.gemm_flops_per_s(16, default=0.0) == pytest.approx(32e12)
    assert 404e12 < m.gemm_flops_per_s(512, default=0.0) < 634e12
    assert m.gemm_flops_per_s(1e6, default=0.0) == pytest.approx(713e12)   # clamped beyond the last point
    assert m.h2d_sizes_bytes == (4 * 2**20, 1024 * 2**20)
    assert m.h2d_rate(4 * 2**20, default=0.0) == pytest.approx(43e9)
    assert m.h2d_rate(2**30, default=0.0) == pytest.approx(55e9)
    assert m.cpu_attention_bytes_per_s == pytest.approx(49e9)
    assert m.cpu_dram_bytes_per_s == pytest.approx(88e9)
    assert m.gpu_hbm_bytes_per_s == pytest.approx(4100e9)


def test_other_profiles_have_no_measured_section():
    """Datasheet profiles carry no measurements, except l4-s2: the paper's published ones of its own host."""
    for name in SHIPPED:
        if name == "l4-s2":
            assert load_profile(name).measured.method.startswith("published: the MoE-Lightning paper")
        elif name != "h200":
            assert load_profile(name).measured is None


# ---------------------------------------------------------------------------------------------------
# bad input

GOOD = """
description = "test machine"

[gpu]
name = "G"
memory_gib = 16
mem_gb_per_s = 300
tflops = { bf16 = 100, fp32 = 10 }
source = "test"

[cpu]
name = "C"
cores = 8
memory_gb = 64
mem_gb_per_s = 50
tflops = { fp32 = 1 }
source = "test"

[link]
h2d_gb_per_s = 20
d2h_gb_per_s = 20
duplex_gb_per_s = 36
source = "test"
"""


def _write(tmp_path, text, name="bad.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _drop_section(text, section):
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skip = line.strip() == f"[{section}]"
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


def test_good_file_loads_by_path(tmp_path):
    p = load_profile(_write(tmp_path, GOOD, "good.toml"))
    assert p.name == "good"
    assert p.gpu.memory_bytes == pytest.approx(16 * GiB)
    assert p.cpu.memory_bytes == pytest.approx(64e9)
    assert p.link.duplex_frac == pytest.approx(0.9)
    assert p.path.endswith("good.toml")


def test_missing_link_section_is_named(tmp_path):
    path = _write(tmp_path, _drop_section(GOOD, "link"))
    with pytest.raises(HardwareError, match="link"):
        load_profile(path)


@pytest.mark.parametrize("section", ["gpu", "cpu"])
def test_missing_unit_section_is_named(tmp_path, section):
    with pytest.raises(HardwareError, match=section):
        load_profile(_write(tmp_path, _drop_section(GOOD, section)))


def test_missing_mem_gb_per_s_is_named(tmp_path):
    text = GOOD.replace("mem_gb_per_s = 50\n", "")
    with pytest.raises(HardwareError, match="mem_gb_per_s") as e:
        load_profile(_write(tmp_path, text))
    assert "cpu" in str(e.value)


def test_missing_source_is_named(tmp_path):
    text = GOOD.replace('duplex_gb_per_s = 36\nsource = "test"', "duplex_gb_per_s = 36")
    with pytest.raises(HardwareError, match="source"):
        load_profile(_write(tmp_path, text))


def test_missing_memory_is_named(tmp_path):
    with pytest.raises(HardwareError, match="memory_gib"):
        load_profile(_write(tmp_path, GOOD.replace("memory_gib = 16\n", "")))


@pytest.mark.parametrize("old,new,key", [
    ("h2d_gb_per_s = 20", "h2d_gb_per_s = -20", "h2d_gb_per_s"),
    ("d2h_gb_per_s = 20", "d2h_gb_per_s = 0", "d2h_gb_per_s"),
    ("mem_gb_per_s = 300", "mem_gb_per_s = -300", "mem_gb_per_s"),
    ("mem_gb_per_s = 50", "mem_gb_per_s = -1", "mem_gb_per_s"),
    ("bf16 = 100", "bf16 = -100", "tflops.bf16"),
    ("memory_gib = 16", "memory_gib = -16", "memory"),
])
def test_non_positive_numbers_are_rejected(tmp_path, old, new, key):
    assert old in GOOD
    with pytest.raises(HardwareError, match=key.replace(".", r"\.")):
        load_profile(_write(tmp_path, GOOD.replace(old, new, 1)))


def test_unknown_profile_lists_builtins():
    with pytest.raises(HardwareError) as e:
        load_profile("no-such-machine")
    msg = str(e.value)
    assert "no-such-machine" in msg
    for name in ("t4-s1", "l4-s2", "h200"):
        assert name in msg


def test_missing_file_path(tmp_path):
    with pytest.raises(HardwareError, match="not found"):
        load_profile(tmp_path / "nope.toml")


def test_invalid_toml(tmp_path):
    with pytest.raises(HardwareError, match="not valid TOML"):
        load_profile(_write(tmp_path, "[gpu\nname = 'x'\n"))


def test_measured_curves_must_match_in_length(tmp_path):
    text = GOOD + '\n[measured]\ngpu_gemm_tokens = [16, 64]\ngpu_gemm_tflops = [30]\nmethod = "m"\ndate = "d"\n'
    with pytest.raises(HardwareError, match="gpu_gemm_tokens"):
        load_profile(_write(tmp_path, text))


def test_measured_curves_are_sorted(tmp_path):
    text = GOOD + '\n[measured]\ngpu_gemm_tokens = [256, 16]\ngpu_gemm_tflops = [400, 30]\nmethod = "m"\ndate = "d"\n'
    m = load_profile(_write(tmp_path, text)).measured
    assert m.gpu_gemm_tokens == (16, 256)
    assert m.gemm_flops_per_s(16, default=0) == pytest.approx(30e12)


def test_env_var_directory_is_searched(tmp_path, monkeypatch):
    _write(tmp_path, GOOD, "my-box.toml")
    monkeypatch.setenv("MOE_LIGHTNING_PROFILES", str(tmp_path))
    assert "my-box" in hardware.available_profiles()
    assert "t4-s1" in hardware.available_profiles()            # built-ins still listed
    p = load_profile("my-box")
    assert p.name == "my-box" and p.cpu.cores == 8
    assert load_profile("t4-s1").gpu.name == "NVIDIA T4"       # built-ins still load


def test_env_var_directory_overrides_builtin(tmp_path, monkeypatch):
    _write(tmp_path, GOOD, "t4-s1.toml")
    monkeypatch.setenv("MOE_LIGHTNING_PROFILES", str(tmp_path))
    assert load_profile("t4-s1").gpu.name == "G"


def test_without_env_var_user_profile_is_unknown(tmp_path, monkeypatch):
    _write(tmp_path, GOOD, "my-box.toml")
    monkeypatch.delenv("MOE_LIGHTNING_PROFILES", raising=False)
    with pytest.raises(HardwareError, match="unknown hardware profile"):
        load_profile("my-box")


@pytest.mark.parametrize("section", ["", "gpu", "cpu", "link", "measured", "calibration", "memory"])
def test_a_key_no_reader_knows_is_refused(tmp_path, section):
    """A typo in any section of a profile is one line naming the key and the section, not ignored."""
    from hrm.profile_keys import PROFILE_KEYS
    data = tomllib.loads(Path(load_profile("h200-measured").path).read_text())
    (data if not section else data[section])["typo_key"] = 3
    assert "typo_key" not in PROFILE_KEYS[section]
    lines = []
    for k, v in data.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {json.dumps(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    path = tmp_path / "typo.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(HardwareError, match=rf"unknown key\(s\) 'typo_key' in {'the top level' if not section else re.escape('[' + section + ']')}"):
        load_profile(path)


def _toml_value(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def test_a_calibration_key_in_measured_is_refused_naming_its_section(tmp_path):
    """The runtime's calibrations live in [calibration]; a profile written before they moved is one line
    that says where the key belongs."""
    text = GOOD + '\n[measured]\ndecode_visit_us = 2000\nmethod = "m"\ndate = "d"\n'
    with pytest.raises(HardwareError, match=r"'decode_visit_us' belongs in \[calibration\], not \[measured\]"):
        load_profile(_write(tmp_path, text))
    text = GOOD + '\n[measured]\nmethod = "m"\ndate = "d"\n\n[calibration]\ngpu_gemm_tokens = [16]\n'
    with pytest.raises(HardwareError, match=r"'gpu_gemm_tokens' belongs in \[measured\], not \[calibration\]"):
        load_profile(_write(tmp_path, text))


def test_calibration_needs_measured_and_joins_it(tmp_path):
    with pytest.raises(HardwareError, match=r"\[calibration\] needs a \[measured\] section"):
        load_profile(_write(tmp_path, GOOD + "\n[calibration]\ndecode_visit_us = 2000\n"))
    text = GOOD + '\n[measured]\ncpu_dram_gb_per_s = 80\nmethod = "m"\ndate = "d"\n\n[calibration]\ndecode_visit_us = 2000\n'
    m = load_profile(_write(tmp_path, text)).measured
    assert m.decode_visit_s == pytest.approx(2e-3) and m.cpu_dram_bytes_per_s == pytest.approx(80 * GB)


def test_every_built_in_profile_keeps_machine_and_calibration_apart():
    from hrm.hardware import PROFILE_DIR
    from hrm.profile_keys import PROFILE_KEYS
    for path in PROFILE_DIR.glob("*.toml"):
        data = tomllib.loads(path.read_text())
        assert not set(data.get("measured", {})) & PROFILE_KEYS["calibration"], path.name
        load_profile(path)


def test_units_come_from_the_key_names():
    from hrm.profile_keys import unit_of
    assert unit_of("h2d_gb_per_s") == GB and unit_of("cpu_attention_overlapped_gb_per_s_by_micro_batch") == GB
    assert unit_of("tflops") == TFLOPS and unit_of("gpu_prefill_rest_tflops_by_shape") == TFLOPS
    assert unit_of("decode_visit_us_by_schedule") == 1e-6 and unit_of("cpu_attention_loop_call_ms") == 1e-3
    assert unit_of("decode_visit_us_grouped_by_schedule") == 1e-6 and unit_of("cpu_attention_call_us") == 1e-6
    assert unit_of("memory_gib") == GiB and unit_of("memory_gb") == GB and unit_of("h2d_sizes_mib") == 2 ** 20
    assert unit_of("prefill_pass_ns_per_token") == 1e-9
    assert unit_of("gpu_gemm_tokens") == 1.0 and unit_of("gpu_allocator_frac") == 1.0


def test_the_uncertainty_follows_the_basis(monkeypatch, tmp_path):
    """A profile measured on its machine carries the measured band; datasheet rates plus the efficiency
    model (a profile without measurements, or --datasheet) carry the band of the measured machine priced
    that way (its unit-level rates and hrm/efficiency.py)."""
    band = json.loads((hardware.PROFILE_DIR / "basis_error.json").read_text())
    measured, datasheet = load_profile("h200-measured"), load_profile("t4-s1")
    assert measured.uncertainty()["median_abs_pct"] == band["measured"]["median_abs_pct"]
    assert measured.uncertainty(use_measured=False)["median_abs_pct"] == band["efficiency_model"]["median_abs_pct"]
    assert datasheet.uncertainty()["p90_abs_pct"] == band["efficiency_model"]["p90_abs_pct"]
    assert load_profile("l4-s2").uncertainty() == datasheet.uncertainty()          # published, partial
    assert "median of" in measured.uncertainty_line() and "\n" not in measured.uncertainty_line()
    assert band["datasheet"]["median_abs_pct"] > band["efficiency_model"]["median_abs_pct"] \
        > band["measured"]["median_abs_pct"]
    monkeypatch.setattr(hardware, "PROFILE_DIR", tmp_path)
    assert measured.uncertainty() is None and measured.uncertainty_line() is None


def test_an_old_profile_is_upgraded_in_place_and_loads_as_the_new(tmp_path, capsys):
    """A profile of the old layout (the calibrations in [measured]) is refused with the way out; `profile
    --upgrade` moves them, checks the result, and a second upgrade has nothing to do."""
    from moe_lightning_cli.main import main as cli
    new_text = Path(load_profile("h200-measured").path).read_text()
    old = tmp_path / "box.toml"
    old.write_text(new_text.replace("\n[calibration]\n", "\n"))
    with pytest.raises(HardwareError, match="profile --upgrade FILE"):
        load_profile(old)
    assert cli(["profile", "--upgrade", str(old)]) == 0
    assert tomllib.loads(old.read_text()) == tomllib.loads(new_text)
    assert load_profile(old).measured == load_profile("h200-measured").measured
    assert cli(["profile", "--upgrade", str(old)]) == 0 and "nothing to upgrade" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [\n")
    assert cli(["profile", "--upgrade", str(bad)]) == 2 and bad.read_text() == "x = [\n"     # nothing replaced


def test_gpus_behind_one_link_share_its_rate(tmp_path):
    """A 4-GPU host whose GPUs sit behind one PCIe switch moves a quarter of what four links move: the
    host's H2D rate, and so a link-bound decode, follow [link] gpus_per_link; a bad value is one line."""
    from hrm.estimate import Setting, estimate
    from hrm.hf_config import load_model
    from hrm.policy import Policy
    from hrm.rates import h2d_bytes_per_s
    from hrm.spec import Workload
    own = (Path(hardware.__file__).parent / "hardware_profiles" / "4xt4-s7.toml").read_text()
    assert "gpus_per_link = 1" in own
    shared = tmp_path / "4xt4-switch.toml"
    shared.write_text(own.replace("gpus_per_link = 1", "gpus_per_link = 4"))
    spec, wl = load_model("mixtral-8x7b"), Workload(avg_prompt_len=256, max_prompt_len=256, gen_len=32)
    a, b = load_profile("4xt4-s7"), load_profile(str(shared))
    assert (a.num_links, b.num_links) == (4, 1)
    rate = lambda hw: float(h2d_bytes_per_s(Setting(spec, hw, wl), 1 << 30))  # noqa: E731
    assert rate(a) == pytest.approx(4 * rate(b))
    policy = Policy(batch_size=256, micro_batch_size=64)
    assert estimate(spec, b, wl, policy).decode_s > 2 * estimate(spec, a, wl, policy).decode_s
    bad = tmp_path / "bad.toml"
    bad.write_text(own.replace("gpus_per_link = 1", "gpus_per_link = 8"))
    with pytest.raises(HardwareError, match="'gpus_per_link' must be a whole number from 1 to the GPU count"):
        load_profile(str(bad))
