"""Hardware probe (runtime/probe/), `moe-lightning profile`, and the HF accelerate peer's smoke test.

Properties only, never wall-clock thresholds: numbers are positive, in SI units (bytes/s, FLOP/s), and a
written profile loads through hrm.hardware.load_profile with the values it was written from.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import os
import tomllib
import statistics

import pytest
import torch

from hrm import ops
from hrm.hardware import load_profile
from hrm.units import GiB
from moe_lightning_cli.main import main
from runtime import probe
from runtime.probe import ProbeError, profile_machine, write_profile_toml
from benchmark_scripts import load_benchmark

MiB = 2 ** 20


@pytest.fixture(scope="module")
def cpu_result() -> dict:
    return profile_machine(quick=True, progress=False, gpu=False)


def _fake_gpu_result(cpu_result: dict) -> dict:
    """What profile_machine returns on a GPU machine (numbers shaped like FACTS.md's H200)."""
    r = copy.deepcopy(cpu_result)
    r["notes"] = []
    r["gpu"] = dict(name="NVIDIA H200", count=1, memory_bytes=150109880320, free_bytes=149e9, multiprocessors=132,
                    capability="9.0", tf32_matmul=False, gemm_tokens=[1, 16, 256, 4096],
                    gemm_flops_per_s=[2.5e12, 32e12, 404e12, 760e12],
                    gemm_shape="[tokens x 4096] x [4096 x 14336] bf16", square_gemm_n=8192,
                    square_gemm_flops_per_s={"bf16": 748e12, "fp16": 750e12, "fp32": 51e12},
                    hbm_copy_size_bytes=1024 * MiB, hbm_copy_bytes_per_s=4.1e12,
                    moe_models=["mixtral-8x7b", "qwen3-30b-a3b"], moe_shapes=[[4096, 14336, 8, 2], [2048, 768, 128, 8]],
                    moe_tokens_per_expert=[[32, 2048], [32, 2048]],
                    moe_flops_per_s=[[300e12, 450e12], [80e12, 250e12]], prefill_prompt_len=256,
                    prefill_tokens=[1024, 4096], prefill_flops_per_s=[250e12, 380e12], prefill_layers=[2, 6],
                    prefill_rest_flops_per_s=[150e12, 260e12], prefill_model="mixtral-8x7b",
                    prefill_pass_s_per_token=2e-6,
                    prefill_rest_by_shape=[{"model": "mixtral-8x7b", "shape": [4096, 4096, 2048], "tokens": [1024, 4096],
                                            "rest_flops_per_s": [150e12, 260e12]},
                                           {"model": "qwen3-30b-a3b", "shape": [2048, 4096, 1024], "tokens": [1024, 4096],
                                            "rest_flops_per_s": [90e12, 140e12]}])
    r["link"] = dict(sizes_bytes=[256 * 1024, 4 * MiB, 1024 * MiB], h2d_bytes_per_s=[20e9, 43e9, 55e9],
                     d2h_bytes_per_s=[22e9, 49e9, 55.2e9], duplex_bytes_per_s=120e9, duplex_size_bytes=1024 * MiB,
                     pageable_h2d_bytes_per_s=14e9, pageable_size_bytes=1024 * MiB)
    r["cpu"]["runtime"] = dict(decode_visit_s=1.5e-3, cpu_attention_call_s=2e-4, visit_model="mixtral-8x7b[1L]",
                               decode_visit_s_by_schedule={"cgopipe": 1.5e-3, "s3": 1.4e-3, "s4": 2.5e-3,
                                                           "blocking": 1.2e-3},
                               decode_visit_s_grouped_by_schedule={"cgopipe": 2.2e-3, "s4": 3e-3},
                               grouped_above_tokens=64,
                               cpu_attention_overlapped_bytes_per_s=31e9, overlap_shape=[32, 512],
                               cpu_attention_overlapped_micro_batches=[32, 256],
                               cpu_attention_overlapped_bytes_per_s_by_micro_batch=[31e9, 37e9],
                               cpu_attention_loop_shapes=[[32, 516.5, 4096], [256, 516.5, 4096], [256, 260.5, 4096]],
                               cpu_attention_loop_call_s=[4.5e-3, 15.8e-3, 9.9e-3],
                               overlap_calls=64, overlap_decode_visit_s=2e-3)
    return r


def test_quick_cpu_profile_is_positive_and_si(cpu_result):
    r = cpu_result
    assert r["gpu"] is None and r["link"] is None
    assert any("CPU part only" in n for n in r["notes"])
    c = r["cpu"]
    assert c["cores"] == os.cpu_count() and c["memory_bytes"] > GiB
    # bytes/s, not GB/s: a DRAM slower than 100 MB/s or faster than 10 TB/s is a unit error
    for key in ("dram_copy_bytes_per_s", "dram_read_bytes_per_s"):
        assert 1e8 < c[key] < 1e13, key
    for dtype, flops in c["matmul_flops_per_s"].items():
        assert 1e6 < flops < 1e16, dtype
    att = c["attention"]
    assert att["kernel"] and len(att["kv_bytes_per_s"]) == len(att["shapes"])
    assert all(1e5 < x < 1e13 for x in att["kv_bytes_per_s"])
    assert c["attention_kv_bytes_per_s"] > 0
    assert r["versions"]["torch"] == torch.__version__
    json.dumps(r)                                        # JSON-ready


def test_runtime_kernel_matches_reference_and_hook_is_measured():
    """The adapter around runtime.cpu_attention computes the same attention as torch SDPA, and a kernel
    passed in is the one that gets timed."""
    kernel, name = probe.runtime_attention_kernel()
    q = torch.randn(3, 8, 16)                            # [batch, q_heads, d]
    k, v = torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16)   # [batch, kv_heads, ctx, d]
    ref = probe.reference_decode_attention(q, k, v)
    # the reference against an explicit GQA loop: q head h uses kv head h // group
    g = 8 // 2
    want = torch.stack([torch.softmax(q[:, h, None, :] @ k[:, h // g].transpose(1, 2) / 4.0, -1) @ v[:, h // g]
                        for h in range(8)], 1)[:, :, 0]
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel(q, k, v), ref, rtol=1e-5, atol=1e-5)
    cache_k, cache_v = torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)     # a cache with 4 free slots
    cache_k[:, :, :5], cache_v[:, :, :5] = k, v
    torch.testing.assert_close(kernel(q, cache_k[:, :, :5], cache_v[:, :, :5]), ref, rtol=1e-5, atol=1e-5)
    if importlib.util.find_spec("runtime.cpu_attention") is not None:
        assert name == "runtime.cpu_attention.decode_attention"

    calls = []

    def counting(q, k, v):
        calls.append(k.shape)
        return probe.reference_decode_attention(q, k, v)

    rates = probe.cpu_attention_bytes_per_s([(2, 16), (1, 32)], 8, 2, 16, torch.float32, kernel=counting, repeats=2)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert (2, 2, 16, 16) in calls and (1, 2, 32, 16) in calls


def test_profile_with_gpu_from_round_trips(cpu_result, tmp_path):
    path = tmp_path / "mybox.toml"
    written = write_profile_toml(cpu_result, path, gpu_from="h200")
    p = load_profile(path)
    h200 = load_profile("h200")
    assert p.name == "mybox" == written.name
    assert p.gpu.name == h200.gpu.name and p.gpu.peak_flops == pytest.approx(h200.gpu.peak_flops, rel=1e-3)
    assert p.gpu.memory_bytes == pytest.approx(h200.gpu.memory_bytes, rel=1e-3)
    assert p.link.h2d_bytes_per_s == pytest.approx(h200.link.h2d_bytes_per_s, rel=1e-3)
    c = cpu_result["cpu"]
    assert p.cpu.cores == os.cpu_count()
    assert p.cpu.memory_bytes == pytest.approx(c["memory_bytes"], rel=1e-3)
    assert p.cpu.mem_bytes_per_s == pytest.approx(c["dram_read_bytes_per_s"], rel=1e-3)
    assert p.cpu.flops_per_s("bf16") == pytest.approx(c["matmul_flops_per_s"]["bf16"], rel=1e-3)
    m = p.measured
    assert m.cpu_attention_bytes_per_s == pytest.approx(c["attention_kv_bytes_per_s"], rel=1e-3)
    assert m.gpu_gemm_tokens == h200.measured.gpu_gemm_tokens          # GPU curves come with the GPU
    assert m.date == cpu_result["date"] and "gpu-from" not in m.method and "'h200'" in m.method
    assert p.cpu.source.startswith(f"measured by moe-lightning profile on {cpu_result['date']}, torch ")
    assert "from profile 'h200'" in p.gpu.source and "from profile 'h200'" in p.link.source
    text = path.read_text()
    assert "torch_version" in text and "# note: no CUDA GPU" in text
    assert sorted(os.listdir(tmp_path)) == ["mybox.toml"]               # no temporary file left behind


def test_profile_from_measured_gpu(cpu_result, tmp_path):
    r = _fake_gpu_result(cpu_result)
    p = write_profile_toml(r, tmp_path / "h200-measured.toml")
    assert load_profile(tmp_path / "h200-measured.toml") == p
    from hrm.profile_keys import PROFILE_KEYS
    data = tomllib.loads((tmp_path / "h200-measured.toml").read_text())
    assert set(data["measured"]) <= PROFILE_KEYS["measured"]                # the machine ...
    assert {"gpu_moe_tflops", "decode_visit_us", "cpu_attention_gb_per_s"} <= set(data["calibration"])  # ... the runtime
    assert p.gpu.name == "NVIDIA H200" and p.gpu.count == 1
    assert p.gpu.peak_flops["bf16"] == pytest.approx(760e12, rel=1e-3)   # best of square GEMM and sweep
    assert p.gpu.peak_flops["fp32"] == pytest.approx(51e12, rel=1e-3)
    assert p.gpu.memory_bytes == pytest.approx(150109880320, rel=1e-3)
    assert p.gpu.mem_bytes_per_s == pytest.approx(4.1e12, rel=1e-3)
    assert p.link.h2d_bytes_per_s == pytest.approx(55e9, rel=1e-3)      # the largest transfer
    assert p.link.duplex_bytes_per_s == pytest.approx(55e9 + 55.2e9, rel=1e-3)   # capped at h2d + d2h
    assert p.link.pageable_h2d_bytes_per_s == pytest.approx(14e9, rel=1e-3)
    m = p.measured
    assert m.gpu_gemm_tokens == (1, 16, 256, 4096)
    assert m.gemm_flops_per_s(256, 0) == pytest.approx(404e12, rel=1e-3)
    assert m.h2d_sizes_bytes[0] == pytest.approx(256 * 1024, rel=1e-3)
    assert m.h2d_rate(4 * MiB, 0) == pytest.approx(43e9, rel=1e-3)
    assert m.gpu_hbm_bytes_per_s == pytest.approx(4.1e12, rel=1e-3)
    assert m.decode_visit_s == pytest.approx(1.5e-3, rel=1e-3)
    assert m.gpu_moe_shapes == ((4096, 14336, 8, 2), (2048, 768, 128, 8))
    assert m.gpu_moe_tokens_per_expert[1] == (32, 2048) and m.gpu_moe_flops_per_s[1][1] == pytest.approx(250e12, rel=1e-3)
    assert m.gpu_prefill_tokens == (1024, 4096) and m.gpu_prefill_rest_flops_per_s[1] == pytest.approx(260e12, rel=1e-3)
    assert m.prefill_pass_s_per_token == pytest.approx(2e-6, rel=1e-3)
    assert m.gpu_prefill_rest_shapes == ((4096, 4096, 2048), (2048, 4096, 1024))
    assert m.gpu_prefill_rest_tokens_by_shape[1] == (1024, 4096)
    assert m.gpu_prefill_rest_flops_per_s_by_shape[1][1] == pytest.approx(140e12, rel=1e-3)
    assert dict(m.decode_visit_s_by_schedule)["s4"] == pytest.approx(2.5e-3, rel=1e-3)
    assert dict(m.decode_visit_s_grouped_by_schedule)["cgopipe"] == pytest.approx(2.2e-3, rel=1e-3)
    assert m.grouped_above_tokens == 64
    assert m.cpu_attention_overlapped_bytes_per_s == pytest.approx(31e9, rel=1e-3)
    assert m.cpu_attention_overlapped_micro_batches == (32, 256)
    assert m.cpu_attention_overlapped_by_micro_batch[1] == pytest.approx(37e9, rel=1e-3)
    assert m.cpu_attention_loop_shapes[2] == (256, 260.5, 4096)
    assert m.cpu_attention_loop_call_s[1] == pytest.approx(15.8e-3, rel=1e-3)
    for section in (p.gpu, p.cpu, p.link):
        assert f"measured by moe-lightning profile on {r['date']}" in section.source
        assert "1x NVIDIA H200" in section.source


def test_no_gpu_and_no_gpu_from_is_refused(cpu_result, tmp_path, capsys):
    with pytest.raises(ProbeError, match="--gpu-from"):
        write_profile_toml(cpu_result, tmp_path / "x.toml")
    assert not (tmp_path / "x.toml").exists()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["profile"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-from" in err and "no CUDA GPU" in err
    assert main(["profile", "--quick", "--gpu-from", "no-such-profile"]) == 2
    assert "no-such-profile" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only path")
def test_cli_profile_cpu_with_gpu_from(tmp_path, capsys):
    out = tmp_path / "here.toml"
    assert main(["profile", "--quick", "--no-progress", "--gpu-from", "h200", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CPU part only" in text and "decode attention" in text and "wrote" in text
    p = load_profile(out)
    assert p.name == "here" and p.gpu.name == "NVIDIA H200" and p.cpu.cores == os.cpu_count()

    assert main(["profile", "--quick", "--no-progress", "--gpu-from", "h200", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpu"] is None and d["cpu"]["dram_read_bytes_per_s"] > 0


def test_cli_profile_prints_gpu_table(cpu_result, tmp_path, capsys, monkeypatch):
    """The GPU path of the subcommand, with the measurements stubbed (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(probe, "profile_machine", lambda *a, **k: _fake_gpu_result(cpu_result))
    out = tmp_path / "gpu.toml"
    assert main(["profile", "-o", str(out), "--name", "lent-h200"]) == 0
    text = capsys.readouterr().out
    assert "NVIDIA H200" in text and "H2D + D2H at once" in text and "[4096 x 14336]" in text
    assert load_profile(out).name == "lent-h200"


@pytest.mark.gpu
def test_quick_gpu_profile(tmp_path):
    r = profile_machine(quick=True, progress=False)
    g, lk = r["gpu"], r["link"]
    assert all(f > 1e9 for f in g["gemm_flops_per_s"]) and g["hbm_copy_bytes_per_s"] > 1e10
    assert all(x > 1e8 for x in lk["h2d_bytes_per_s"] + lk["d2h_bytes_per_s"])
    assert lk["duplex_bytes_per_s"] > 0 and lk["pageable_h2d_bytes_per_s"] > 0
    p = write_profile_toml(r, tmp_path / "gpu.toml")
    assert p.gpu.flops_per_s("bf16") >= max(g["gemm_flops_per_s"]) * (1 - 1e-3)
    assert len(p.measured.gpu_moe_shapes) == len(g["moe_shapes"]) >= 3
    assert all(f > 1e9 for curve in g["moe_flops_per_s"] for f in curve)
    assert len(p.measured.gpu_prefill_tokens) == len(g["prefill_tokens"]) and g["prefill_pass_s_per_token"] >= 0
    assert all(1e12 < f < 2 * p.gpu.flops_per_s("bf16") for f in g["prefill_flops_per_s"])
    assert sorted(dict(p.measured.decode_visit_s_by_schedule)) == ["blocking", "cgopipe", "s3", "s4"]
    if r["cpu"]["runtime"]["decode_visit_s_grouped_by_schedule"]:                 # sm90+: grouped GEMM
        assert len(p.measured.decode_visit_s_grouped_by_schedule) == 4 and p.measured.grouped_above_tokens == 64
    assert p.measured.cpu_attention_overlapped_bytes_per_s > 0


@pytest.mark.slow
def test_hf_accelerate_peer_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    peer = load_benchmark("peer_hf_accelerate")
    out = tmp_path / "peer.json"
    assert peer.main(["--tiny", "--device", "cpu", "--batch-sizes", "1,3", "--prompt-len", "8", "--gen-len", "4",
                      "--output", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["environment"]["transformers"] and d["environment"]["accelerate"] and d["environment"]["torch"]
    assert "peer_hf_accelerate.py --tiny" in d["command"] and d["date"]
    assert [r["batch_size"] for r in d["rows"]] == [1, 3]
    for r in d["rows"]:
        assert r["status"] == "ok" and r["generated_tokens"] == 4 * r["batch_size"]
        assert r["tokens_per_s"] > 0 and r["weights_total_bytes"] > 0
    rows = list(csv.DictReader((tmp_path / "peer.csv").open()))
    assert [int(r["batch_size"]) for r in rows] == [1, 3] and rows[0]["transformers"]


def test_runtime_overheads_measured_on_a_tiny_model():
    """The runtime's fixed decode costs come from running its own loop (a machine property)."""
    from dataclasses import replace

    from hrm.hf_config import load_model
    from runtime.probe import runtime_overheads

    spec = replace(load_model("mixtral-8x7b"), hidden_size=64, moe_intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256)
    r = runtime_overheads(spec, visits=32, calls=20)
    assert 0 < r["decode_visit_s"] < 1.0
    assert sorted(r["decode_visit_s_by_schedule"]) == ["blocking", "cgopipe", "s3", "s4"]
    assert r["decode_visit_s"] == r["decode_visit_s_by_schedule"]["cgopipe"]
    assert all(0 < v < 1.0 for v in r["decode_visit_s_by_schedule"].values())
    assert 0 < r["cpu_attention_call_s"] < 0.1


def test_prefill_costs_split_the_engines_prefill_into_a_line_over_layers(monkeypatch):
    """The prefill probe runs the runtime's own prefill at two depths; the slope per (layer, chunk) gives
    the rate over hrm.ops.prefill_layer's FLOPs, the intercept the per-pass cost per prompt token."""
    from dataclasses import replace

    from hrm import ops
    from hrm.hf_config import load_model
    from runtime import engine as engine_mod
    from runtime.probe import prefill_costs

    spec = replace(load_model("mixtral-8x7b"), hidden_size=64, moe_intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256)
    fake = {2: 0.050, 6: 0.130}                          # seconds of prefill by layers: 20 ms per layer
    real = engine_mod.Engine.generate
    seen = []

    def timed(self, prompts, max_new_tokens, **kw):
        tokens, m = real(self, prompts, max_new_tokens, **kw)
        seen.append((self.policy.micro_batch_size, len(prompts), self.spec.num_hidden_layers))
        return tokens, replace(m, prefill_s=fake[self.spec.num_hidden_layers])
    monkeypatch.setattr(engine_mod.Engine, "generate", timed)
    r = prefill_costs(spec, seqs=(2, 4), prompt_len=16, pass_tokens=256, repeats=1)
    # passes of 256 tokens: 8 micro-batches of 2 sequences, and the floor of 4 micro-batches of 4
    assert sorted(set(seen)) == [(2, 16, 2), (2, 16, 6), (4, 16, 2), (4, 16, 6)]
    onces = []
    for n, chunks, rate in zip((2, 4), (8, 4), r["flops_per_s"]):
        per_layer_chunk = 0.080 / (4 * chunks)
        assert rate == pytest.approx(float(ops.prefill_layer(spec, n, 16).flops) / per_layer_chunk, rel=1e-9)
        onces.append((0.050 - 2 * chunks * per_layer_chunk) / (n * chunks * 16))   # 10 ms per pass
    assert r["pass_s_per_token"] == pytest.approx(statistics.median(onces))


def test_prefill_probe_depths_fit_the_gpu():
    """The prefill probe's two depths keep the resident weights within 60% of the free GPU memory: a
    16 GB card measures at 1 and 3 Mixtral layers, a large one at 2 and 6; none where 2 do not fit."""
    from hrm.hf_config import load_model
    from runtime.probe import prefill_layers

    spec = load_model("mixtral-8x7b")
    assert prefill_layers(spec, 139 * 2**30) == (2, 6)
    lo, hi = prefill_layers(spec, 15 * 2**30)
    model = spec.with_layers(hi)
    assert lo == 1 and hi >= 2 and probe.resident_weight_bytes(model) <= 0.6 * 15 * 2**30
    assert prefill_layers(spec, 6 * 2**30) is None


def test_attention_in_pipeline_counts_every_call():
    """The overlapped attention rate divides the KV bytes of every decode attention call of the loop by the
    calls' busy time (on the CPU here: the same code path without streams)."""
    from dataclasses import replace

    from hrm.hf_config import load_model
    from runtime.probe import attention_in_pipeline

    spec = replace(load_model("mixtral-8x7b"), hidden_size=64, moe_intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256)
    r = attention_in_pipeline(spec, micro_batch=4, micro_batches=3, prompt_len=32, steps=4)
    assert r["overlap_calls"] == 3 * 4                     # micro-batches x decode steps x one layer
    assert 1e6 < r["cpu_attention_overlapped_bytes_per_s"] < 1e13
    assert r["overlap_shape"] == [4, 32] and r["overlap_decode_visit_s"] > 0
    deep = attention_in_pipeline(spec, micro_batch=4, micro_batches=3, prompt_len=32, steps=4, layers=3)
    assert deep["overlap_calls"] == 3 * 4 * 3               # ... x three layers


def test_profile_table_shows_the_runtime_rows(cpu_result, capsys):
    from moe_lightning_cli.profile import _print
    r = _fake_gpu_result(cpu_result)
    r["elapsed_s"] = 1.0
    _print(r, None, None, "x.toml")
    out = capsys.readouterr().out
    for text in ("s4, micro-batches of 1", "micro-batches of 65 (grouped MoE)", "inside the CGOPipe loop",
                 "runtime MoE layer at qwen3-30b-a3b's shape", "(all but the experts: 260.0)"):
        assert text in out, text


def test_prefill_by_model_measures_each_attention_shape_once_and_notes_what_it_could_not(monkeypatch):
    """The profile's prefill step: the profiled model's prefill (costs and rest rate), then the rest rate of
    each other MOE_MODELS model of another attention shape; a model whose rest cannot be derived is a note,
    and the profile still holds the others."""
    from hrm.hf_config import load_model
    from runtime.probe import machine_profile as mp

    monkeypatch.setattr(mp.torch.cuda, "mem_get_info", lambda: (100 * 2**30, 140 * 2**30))
    ran = []

    def costs(m, seqs, layers, repeats):
        ran.append(m.name)
        return {"flops_per_s": [300e12] * len(seqs), "pass_s_per_token": 1e-6}

    monkeypatch.setattr(mp, "prefill_costs", costs)
    dense = []

    def rest(m, tokens, rates, p, dense_ffn_s, repeats):
        dense.append((m.name, dense_ffn_s(ops.dense_ffn(m, 4096), 4096)))
        return [None] * len(tokens) if m.name == "qwen3-30b-a3b" else [200e12] * len(tokens)
    monkeypatch.setattr(mp, "prefill_rest_flops", rest)
    notes = []
    gemm = {"gemm_tokens": [1024, 4096], "gemm_flops_per_s": [200e12, 400e12], "hbm_copy_bytes_per_s": 4e12}
    out = mp.prefill_by_model(load_model("mixtral-8x7b"), (4, 16), quick=True, notes=notes, gemm=gemm)
    assert ran == ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite"]
    assert out["prefill_tokens"] == [1024, 4096] and out["prefill_rest_flops_per_s"] == [200e12, 200e12]
    assert [r["model"] for r in out["prefill_rest_by_shape"]] == ["mixtral-8x7b", "olmoe-1b-7b", "deepseek-v2-lite"]
    assert out["prefill_rest_by_shape"][1]["shape"] == [2048, 2048, 4096]
    assert len(notes) == 1 and "qwen3-30b-a3b" in notes[0]
    # the dense FFN the rest leaves out is priced at the profile's GEMM curve: none in Mixtral, DeepSeek's shared
    # experts and leading dense layer at 400 TFLOP/s at 4,096 tokens
    dsv2 = load_model("deepseek-v2-lite")
    assert dict(dense)["mixtral-8x7b"] == 0.0
    assert dict(dense)["deepseek-v2-lite"] == pytest.approx(float(ops.dense_ffn(dsv2, 4096).flops) / 400e12)


def test_a_compute_probe_runs_its_kernel_for_sustain_s_before_timing(monkeypatch):
    """The clocks a whole prefill runs at are the ones under load: the kernel runs back to back for
    sustain_s before the timed calls (the timing itself is CUDA-only; the warm-up is checked here)."""
    import time

    import torch

    from runtime.probe import base
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    stamps = []
    t0 = time.perf_counter()
    base._sustain(lambda: stamps.append(time.perf_counter()), 0.05)
    assert stamps[-1] - t0 >= 0.04 and len(stamps) % 4 == 0
    assert base.SUSTAIN_S >= 0.5


def test_the_moe_curve_times_the_routed_experts_only(monkeypatch):
    """gpu_moe_flops_per_s prices the routed experts (hrm.ops.routed_experts); a shared expert is the dense
    FFN's (hrm.ops.dense_ffn, at the GEMM rate), so the layer it times has none."""
    from dataclasses import replace

    from hrm.hf_config import load_model
    from runtime import moe as moe_mod
    from runtime.probe import calibration

    tiny = replace(load_model("qwen1.5-moe-a2.7b"), hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                   head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=128, num_experts=8,
                   num_experts_per_tok=2, vocab_size=256)
    shared, real = [], moe_mod.moe
    monkeypatch.setattr(moe_mod, "moe", lambda h, layer, table, spec, **kw: (shared.append(layer.shared), real(h, layer, table, spec))[1])
    monkeypatch.setattr(calibration, "_median_cuda_s", lambda fn, repeats, sustain_s=0.0: (fn(), 0.5)[1])
    rates = calibration.gpu_moe_flops_per_s(tiny, [4.0], repeats=1, device="cpu")
    assert shared == [None]
    assert rates == [pytest.approx(float(ops.routed_experts(tiny, 16).flops) / 0.5)]


def test_a_measured_gpu_to_gpu_rate_prices_the_allreduces(cpu_result, tmp_path):
    """On several GPUs the profile measures GPU 0 -> GPU 1 ([link] peer_gb_per_s); tensor-parallel plans
    price their all-reduces at it, and at the host link's rate where it is not measured."""
    from dataclasses import replace

    from hrm.estimate import allreduce_s
    from hrm.hf_config import load_model
    from hrm.policy import Policy
    from hrm.rates import Setting
    from hrm.spec import Workload

    r = _fake_gpu_result(cpu_result)
    r["gpu"]["count"] = 2
    r["link"].update(peer_bytes_per_s=200e9, peer_size_bytes=1024 * MiB)
    p = write_profile_toml(r, tmp_path / "two.toml")
    assert load_profile(tmp_path / "two.toml") == p and p.link.peer_bytes_per_s == pytest.approx(200e9, rel=1e-3)
    unmeasured = write_profile_toml(_fake_gpu_result(cpu_result), tmp_path / "one.toml")
    assert unmeasured.link.peer_bytes_per_s == 0.0 and unmeasured.link.gpu_to_gpu_bytes_per_s == unmeasured.link.h2d_bytes_per_s
    mixtral = load_model("mixtral-8x7b")
    fast = float(allreduce_s(Setting.of(mixtral, p, Workload(77, 418, 32), Policy(8, 8)), 4096))
    slow_link = replace(p, link=replace(p.link, peer_bytes_per_s=0.0))
    slow = float(allreduce_s(Setting.of(mixtral, slow_link, Workload(77, 418, 32), Policy(8, 8)), 4096))
    assert 0 < fast < slow


def test_the_loop_probe_also_measures_the_calls_of_another_kv_shape(monkeypatch):
    """Besides the profiled model's settings, the in-loop attention probe runs Qwen3-30B-A3B's KV shape (2,048
    bytes a slot) at LOOP_SHAPE_SETTINGS, whose rows join cpu_attention_loop_shapes; the curve over
    micro-batch sizes stays the profiled model's. Quick profiles skip it. Each scaled 8-bit KV format's calls
    run at LOOP_KV_FORMAT_SETTING and are reported over bf16's calls there."""
    from hrm.formats import SCALED_KV_FORMATS
    from hrm.hf_config import load_model
    from runtime.probe import calibration as cal

    seen = []

    def fake(spec, micro_batch=32, micro_batches=8, prompt_len=512, steps=8, weights_gpu_frac=1.0, layers=1):
        seen.append(spec.name)
        b = spec.kv_elems_per_token_layer * spec.dtypes.kv_bytes
        return {"cpu_attention_overlapped_bytes_per_s": 30e9, "loop_shape": [micro_batch, prompt_len + 4.5, b],
                "loop_call_s": 1e-3 * micro_batch / 256 * (0.9 if spec.dtypes.kv_format == "int8" else 1.0)}
    monkeypatch.setattr(cal, "attention_in_pipeline", fake)
    out = cal.attention_in_pipeline_by_micro_batch(load_model("mixtral-8x7b"))
    n = len(cal.OVERLAP_SETTINGS)
    formats = len(SCALED_KV_FORMATS)
    assert seen == ["mixtral-8x7b"] * n + ["qwen3-30b-a3b"] * len(cal.LOOP_SHAPE_SETTINGS) + ["mixtral-8x7b"] * formats
    assert out["cpu_attention_loop_time_of_compute_by_kv_format"]["int8"] == pytest.approx(0.9)
    assert out["cpu_attention_loop_time_of_compute_by_kv_format"]["fp8"] == pytest.approx(1.0)
    assert [s[2] for s in out["cpu_attention_loop_shapes"]] == [4096] * n + [2048] * len(cal.LOOP_SHAPE_SETTINGS)
    assert len(out["cpu_attention_overlapped_bytes_per_s_by_micro_batch"]) == n
    assert len({s[1] for s in out["cpu_attention_loop_shapes"][n:]}) == 2          # two contexts
    seen.clear()
    cal.attention_in_pipeline_by_micro_batch(load_model("mixtral-8x7b"), quick=True)
    assert seen == ["mixtral-8x7b"] * (len(cal.OVERLAP_SETTINGS_QUICK) + formats)
