"""Issue 15: what-if storage (--weight-dtype / --kv-dtype), estimate checked against plan's budgets, the
host memory every answer assumes, and --hardware auto."""
from __future__ import annotations

import json

import pytest

from moe_lightning_cli.main import main as cli


def run_json(capsys, *args):
    rc = cli([*args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_weight_dtype_what_if_reprices_the_plan(capsys):
    base = run_json(capsys, "plan", "--no-baselines")["plan"]
    int4 = run_json(capsys, "plan", "--no-baselines", "--weight-dtype", "int4")["plan"]
    d = int4["model"]["spec"]["dtypes"]
    assert d["weight_bytes"] == 0.5 and d["quantization"] == "--weight-dtype int4"
    assert "expert_weight_bytes" not in d            # experts as the other weights: left out of the digest
    assert d["name"] == "bfloat16" and d["kv_bytes"] == 2.0
    # a quarter of the expert bytes to stream: a different, faster plan
    assert int4["estimate"]["throughput_tok_s"] > 1.2 * base["estimate"]["throughput_tok_s"]


def test_weight_dtype_bf16_undoes_the_configs_mxfp4(capsys):
    args = ("plan", "--no-baselines", "--model", "gpt-oss-120b", "--hardware", "h200")
    q = run_json(capsys, *args)["plan"]
    bf16 = run_json(capsys, *args, "--weight-dtype", "bf16")["plan"]
    assert q["model"]["spec"]["dtypes"]["expert_weight_bytes"] == 0.53125
    assert "quantization" not in bf16["model"]["spec"]["dtypes"]      # back to the model's own dtype
    assert bf16["model"]["spec_sha256"] != q["model"]["spec_sha256"]
    assert bf16["estimate"]["throughput_tok_s"] < q["estimate"]["throughput_tok_s"]


def test_kv_dtype_halves_the_kv_cache_plus_its_scales(capsys):
    """fp8 and int8 KV: a byte per value and one fp32 scale per token and kv head (head_dim 128)."""
    args = ("estimate", "-N", "256", "--mu", "32")
    base = run_json(capsys, *args)
    kv = lambda d: d["memory_bytes"]["pinned"]["kv_cache"]      # noqa: E731
    for name in ("fp8", "int8"):
        assert kv(run_json(capsys, *args, "--kv-dtype", name)) == pytest.approx(kv(base) / 2 * (1 + 4 / 128), rel=1e-12)


def test_storage_is_printed(capsys):
    assert cli(["estimate", "--model", "gpt-oss-20b", "--hardware", "h200", "--weight-dtype", "fp8"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "at 1 B/param" in out and "stored as --weight-dtype fp8" in out


def test_unknown_what_if_dtype_is_one_line(capsys):
    assert cli(["plan", "--kv-dtype", "int3"]) == 2
    err = capsys.readouterr().err
    assert "--kv-dtype" in err and "int3" in err and err.count("\n") == 1


# ---- estimate against plan's budgets; the host memory each answer assumed --------------------------

QWEN_4090 = ("estimate", "--model", "qwen3-30b-a3b", "--hardware", "rtx4090", "-N", "4000")


def test_estimate_says_what_does_not_fit(capsys):
    d = run_json(capsys, *QWEN_4090)
    assert d["fits"] is False and len(d["does_not_fit"]) == 1
    line = d["does_not_fit"][0]
    assert line.startswith("CPU memory needs") and "profile rtx4090" in line and "short by" in line
    assert d["memory_bytes"]["cpu_total"] > d["budgets"]["cpu_bytes"]
    assert cli(list(QWEN_4090)) == 0                    # a prediction still, with the warning
    out = capsys.readouterr().out.replace("\n", " ")
    assert "does not fit: CPU memory needs" in out and "budget from" in out


def test_estimate_fits_with_a_larger_host(capsys):
    d = run_json(capsys, *QWEN_4090, "--cpu-memory", "1TB")
    assert d["fits"] is True and d["does_not_fit"] == [] and d["budgets"]["cpu_source"].startswith("user: ")
    assert cli([*QWEN_4090, "--cpu-memory", "1TB"]) == 0
    assert "fits the budgets" in capsys.readouterr().out


def test_estimate_and_plan_assume_the_same_budgets(capsys):
    for extra in ((), ("--cpu-frac", "0.8"), ("--gpu-memory", "12GiB", "--cpu-memory", "100GB")):
        plan = run_json(capsys, "plan", "--no-baselines", *extra)["plan"]
        est = run_json(capsys, "estimate", "-N", "64", "--mu", "16", *extra)
        assert est["budgets"] == plan["budgets"]
    half = run_json(capsys, "plan", "--no-baselines", "--cpu-frac", "0.8")["plan"]["budgets"]
    assert half["cpu_source"].startswith("0.8 x ") and "(profile t4-s1)" in half["cpu_source"]


@pytest.mark.parametrize("cmd", ["plan", "estimate"])
@pytest.mark.parametrize("level", ["cpu", "gpu"])
def test_a_size_and_a_share_of_one_level_are_refused_together(capsys, cmd, level):
    assert cli([cmd, f"--{level}-memory", "20GB", f"--{level}-frac", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"--{level}-memory and --{level}-frac both given" in err and err.count("\n") == 1


def test_plan_prints_the_host_memory_it_assumed(capsys):
    assert cli(["plan", "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "budget from" in out and "(profile t4-s1)" in out


def test_paper_search_refuses_shares(capsys):
    assert cli(["plan", "--search", "paper", "--cpu-frac", "0.5"]) == 2
    assert "--search paper" in capsys.readouterr().err


def test_every_listed_subcommand_has_a_module():
    from pathlib import Path

    import moe_lightning_cli
    from moe_lightning_cli.main import SUBCOMMANDS, build_parser

    _, modules = build_parser()
    assert list(modules) == list(SUBCOMMANDS)
    here = Path(moe_lightning_cli.__file__).parent
    assert all((here / f"{name}.py").is_file() for name in SUBCOMMANDS)
    assert "validate" not in SUBCOMMANDS     # benchmarks/validate.py is the sweep; no subcommand claims it


# ---- --hardware auto -------------------------------------------------------------------------------

GiB = 2 ** 30


@pytest.fixture
def machine(monkeypatch):
    """Set what detection finds: machine(gpu_name, gpu_gib, count=1, host_gib=None (this host's))."""
    from hrm.host import local_cpu_name, proc_kib_bytes
    from moe_lightning import machine as mod

    def set_(gpu_name, gpu_gib=0.0, count=1, host_gib=None):
        host = host_gib * GiB if host_gib else float(proc_kib_bytes("MemTotal"))
        found = mod.DetectedMachine(gpu_name, gpu_gib * GiB, count if gpu_name else 0, local_cpu_name(), 12, host)
        monkeypatch.setattr(mod, "detect", lambda: found)
        return found
    return set_


def test_auto_uses_the_measured_profile_of_this_gpu(capsys, machine):
    machine("NVIDIA H200", 139.8)
    plan = run_json(capsys, "plan", "--no-baselines", "--hardware", "auto")["plan"]
    hw = plan["hardware"]
    assert hw["name"] == "auto:h200-measured" and hw["measured"] is not None
    assert "built-in profile h200-measured" in hw["description"] and "measured efficiencies" in hw["description"]
    assert hw["cpu"]["cores"] == 12 and hw["gpu"]["memory_bytes"] == 139.8 * GiB
    # the host is this one: its budget is what it has available now, and the answer says so
    assert plan["budgets"]["cpu_source"].startswith("this machine: ")
    assert cli(["plan", "--no-baselines", "--hardware", "auto"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "hardware auto: detected 1 x NVIDIA H200" in out and "this machine:" in out


@pytest.mark.parametrize("gpu,gib,count,profile", [
    ("Tesla T4", 14.6, 1, "t4-s1"),                       # the driver's name, not the profile's
    ("Tesla T4", 14.6, 2, "2xt4-s6"),
    ("NVIDIA H100 80GB HBM3", 79.2, 1, "h100"),           # same model, memory within 10%
    ("NVIDIA A100-SXM4-80GB", 79.2, 1, "a100-80gb"),
    ("NVIDIA GeForce RTX 4090", 23.6, 1, "rtx4090"),
])
def test_auto_matches_the_gpu(machine, gpu, gib, count, profile):
    from moe_lightning.machine import auto_profile
    machine(gpu, gib, count, host_gib=64)
    hw, how = auto_profile()
    assert hw.name == f"auto:{profile}" and hw.gpu.count == count
    assert hw.cpu.memory_bytes == 64 * GiB and hw.gpu.memory_bytes == gib * GiB and profile in how


@pytest.mark.parametrize("gpu,needle", [(None, "no CUDA GPU on this machine"),
                                        ("NVIDIA B200", "no built-in profile of this GPU (NVIDIA B200)")])
def test_auto_without_a_profile_is_one_line(capsys, machine, gpu, needle):
    machine(gpu, 180.0)
    assert cli(["estimate", "--hardware", "auto"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "--hardware NAME|FILE" in err and err.count("\n") == 1


def test_detect_reads_this_machine():
    from hrm.host import proc_kib_bytes
    from moe_lightning.machine import detect
    m = detect()
    assert m.host_memory_bytes == proc_kib_bytes("MemTotal") and m.cpu_cores >= 1
    torch = pytest.importorskip("torch")
    assert (m.gpu_name is None) == (not torch.cuda.is_available())


# ---- how long for K prompts of the built-in workload ----------------------------------------------

def test_num_prompts_prices_the_whole_job(capsys):
    from dataclasses import replace

    from hrm.estimate import estimate
    from optimizer.plan import Plan

    d = run_json(capsys, "plan", "--no-baselines", "--num-prompts", "1")
    plan = Plan.from_dict(d["plan"])
    n, per_pass = plan.policy.batch_size, plan.estimate.total_s
    for k in (n, 2 * n + 7):
        job = run_json(capsys, "plan", "--no-baselines", "--num-prompts", str(k))["job"]
        full, rest = divmod(k, n)
        last = (estimate(plan.spec, plan.hardware, plan.workload,
                         replace(plan.policy, batch_size=rest, micro_batch_size=min(plan.policy.micro_batch_size, rest))
                         ).total_s if rest else 0.0)
        assert job["passes"] == full + (rest > 0) and job["generated_tokens"] == k * plan.workload.gen_len
        assert job["seconds"] == pytest.approx(full * per_pass + last, rel=1e-9)
        assert (job["seconds"] > full * per_pass) == bool(rest)
    assert cli(["plan", "--no-baselines", "--num-prompts", str(n + 1)]) == 0
    assert f"the whole job: {n + 1:,} prompts in 2 passes of N <= {n:,}" in capsys.readouterr().out


def test_generate_plans_on_the_profile_of_this_gpu(monkeypatch):
    """The batch job with no plan and no --hardware takes the profile auto would: a driver name such as
    'Tesla T4' finds t4-s1's family, and an unknown GPU is one line."""
    import torch

    import moe_lightning.machine as machine
    from moe_lightning.llm import machine_profile
    from moe_lightning.requests import RequestError
    from hrm.units import GiB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(machine, "detect", lambda: machine.DetectedMachine("Tesla T4", 15 * GiB, 1, "cpu", 8, 190 * GiB))
    hw, how = machine_profile(None)
    assert hw.gpu.name.lower().endswith("t4") and "Tesla T4" in how
    monkeypatch.setattr(machine, "detect", lambda: machine.DetectedMachine("Voodoo 5", 1 * GiB, 1, "cpu", 8, 64 * GiB))
    with pytest.raises(RequestError, match="no built-in hardware profile for this GPU"):
        machine_profile(None)


def test_expert_dtype_prices_each_format_with_its_own_plan(capsys):
    """--expert-dtype: the experts' bytes from hrm.formats (scales included), the rest of the model as it
    was; plan gives every format's own best plan beside the chosen one; the runtime takes
    every expert format but not other weights quantized."""
    from hrm.formats import EXPERT_FORMATS
    out = run_json(capsys, "plan", "--no-baselines", "--expert-dtype", "int8")
    d = out["plan"]["model"]["spec"]["dtypes"]
    assert d["quantization"] == "--expert-dtype int8" and d["weight_bytes"] == 2.0
    assert d["expert_weight_bytes"] == pytest.approx(1 + 2 / 4096 * 2 / 3 + 2 / 14336 / 3)
    rows = {r["expert_dtype"]: r for r in out["expert_formats"]}
    assert list(rows) == list(EXPERT_FORMATS)
    assert rows["int8"]["throughput_tok_s"] == pytest.approx(out["plan"]["estimate"]["throughput_tok_s"])
    assert rows["int8"]["throughput_tok_s"] > 1.5 * rows["bf16"]["throughput_tok_s"]
    # int4 halves the link's bytes again, but on t4-s1 at achievable GPU rates (hrm/efficiency.py) its plan is
    # bound by the GPU (the GEMMs, and a dequantization with 7 bytes of traffic per weight to int8's 3), no
    # longer by the link: not faster than int8
    int4 = run_json(capsys, "plan", "--no-baselines", "--expert-dtype", "int4")["plan"]["estimate"]
    assert int4["bound"] == "gpu" and out["plan"]["estimate"]["bound"] != "gpu"
    assert int4["throughput_tok_s"] == pytest.approx(rows["int4"]["throughput_tok_s"])
    assert rows["int4"]["throughput_tok_s"] <= 1.01 * rows["int8"]["throughput_tok_s"]
    assert rows["bf16"]["expert_bytes_per_weight"] == 2.0
    base = run_json(capsys, "plan", "--no-baselines")["plan"]
    assert rows["bf16"]["throughput_tok_s"] == pytest.approx(base["estimate"]["throughput_tok_s"])
    assert "expert_formats" not in run_json(capsys, "plan", "--no-baselines")
    from hrm.hf_config import load_model
    from runtime.model import UnsupportedModel, check_supported
    mixtral = load_model("mixtral-8x7b")
    for name in EXPERT_FORMATS:                     # the runtime stores every expert format
        check_supported(mixtral.with_expert_format(name))
    whole = mixtral.with_dtypes(mixtral.dtypes.stored_as(weight="int8")).with_expert_format("int8")
    with pytest.raises(UnsupportedModel, match="--weight-dtype int8 \\(it stores weights and KV in bf16"):
        check_supported(whole)


def test_expert_dtype_int4_refuses_widths_it_cannot_group(capsys):
    from hrm.hf_config import load_model
    from hrm.spec import SpecError
    spec = load_model("mixtral-8x7b")
    odd = spec.__class__(**{**spec.__dict__, "moe_intermediate_size": 200})
    with pytest.raises(SpecError, match="--expert-dtype: int4 experts need input widths divisible by 128, got 200"):
        odd.with_expert_format("int4")
    assert odd.with_expert_format("int8").dtypes.quantization == "--expert-dtype int8"
