"""`moe-lightning plan`: the built-in default prints the tables, puts attention on the CPU for
Mixtral-8x7B on the paper's T4 host (t4-s1) and beats every baseline; infeasible requests exit 2 with
one line on stderr (issue 3's acceptance)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hrm.hardware import load_profile
from moe_lightning_cli import plan as plan_cli
from optimizer.plan import Plan


def run_plan(capsys, *args):
    rc = plan_cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err




def test_default_prints_the_tables(capsys):
    rc, out, err = run_plan(capsys)
    assert rc == 0 and err == ""
    assert "mixtral-8x7b on t4-s1" in out
    for heading in ("chosen policy", "prediction", "memory per level", "baselines"):
        assert heading in out
    for text in ("throughput (end to end)", "decode throughput", "binding resource", "FlexGen S4",
                 "FlexGen(c) S3", "DeepSpeed-Zero", "All on GPU", "ours is"):
        assert text in out


def test_default_choice_beats_every_baseline(capsys):
    rc, out, _ = run_plan(capsys, "--json")
    assert rc == 0
    d = json.loads(out)
    plan = Plan.from_dict(d["plan"])
    assert plan.spec.name == "mixtral-8x7b" and plan.hardware.name == "t4-s1"
    assert (plan.workload.avg_prompt_len, plan.workload.max_prompt_len, plan.workload.gen_len) == (77, 418, 128)
    assert not plan.policy.attention_on_gpu                 # attention next to the KV cache, on the CPU
    feasible = [b for b in d["baselines"] if b["feasible"]]
    assert {b["key"] for b in d["baselines"]} == {"flexgen", "flexgen-c", "deepspeed", "all-on-gpu"}
    assert len(feasible) >= 3
    for b in feasible:
        assert plan.throughput_tok_s >= b["throughput_tok_s"], b["label"]
        if b["key"] in ("flexgen", "deepspeed"):         # other placements or schedules: strictly slower
            assert b["speedup"] > 1.0, b["label"]
        elif b["speedup"] <= 1.0:
            # On this link-bound T4 one micro-batch suffices (prefill runs in chunks, so mu is free):
            # then CGOPipe has nothing to overlap and is S3, at the same policy.
            assert b["key"] == "flexgen-c" and plan.policy.num_micro_batches == 1
            assert (b["policy"]["batch_size"], b["policy"]["micro_batch_size"]) == (
                plan.policy.batch_size, plan.policy.micro_batch_size)
    assert plan.memory.within_budgets


def test_output_file_is_a_loadable_plan(capsys, tmp_path):
    path = tmp_path / "plan.json"
    rc, out, _ = run_plan(capsys, "--model", "olmoe-1b-7b", "--hardware", "l4-s2", "--no-baselines", "-o", str(path))
    assert rc == 0 and f"wrote {path}" in out
    plan = Plan.load(path)
    assert plan.spec.name == "olmoe-1b-7b" and plan.solver == "grid"


def test_a_plan_of_several_gpus_says_how_to_run_it(capsys, tmp_path):
    path = tmp_path / "tp.json"
    rc, out, _ = run_plan(capsys, "--hardware", "2xt4-s6", "--no-baselines", "-o", str(path))
    assert rc == 0 and f"torchrun --standalone --nproc-per-node 2 -m moe_lightning_cli.main run --plan {path}" in out
    _, one, _ = run_plan(capsys, "--hardware", "l4-s2", "--no-baselines", "-o", str(tmp_path / "one.json"))
    assert "torchrun" not in one
    _, mla, _ = run_plan(capsys, "--model", "deepseek-v2-lite", "--hardware", "2xt4-s6", "--no-baselines",
                         "-o", str(tmp_path / "mla.json"))
    assert "the runtime cannot run it on 2 GPUs (tensor parallelism does not support attention 'mla'" in mla
    assert "torchrun" not in mla


@pytest.mark.parametrize("args,needle", [
    (("--model", "mixtral-8x22b"), "short by"),                       # cannot fit even fully streamed
    (("--gpu-memory", "2GiB"), "non-expert weights"),                 # budget below the non-expert weights
    (("--cpu-memory", "40GiB"), "short by"),
    (("--gen-len", "0"), "--gen-len"),                                # zero / negative lengths
    (("--prompt-len", "-5"), "--prompt-len"),
    (("--gpu-memory", "lots"), "memory size"),
])
def test_infeasible_requests_exit_2_with_one_line(capsys, args, needle):
    rc, out, err = run_plan(capsys, *args, "--no-baselines")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("moe-lightning plan: error:")


def test_paper_mode_from_the_cli(capsys):
    rc, out, _ = run_plan(capsys, "--hardware", "t4-paper", "--prompt-len", "418", "--gen-len", "128", "--padded",
                          "--search", "paper", "--json")
    assert rc == 0
    plan = json.loads(out)["plan"]
    assert (plan["policy"]["batch_size"], plan["policy"]["micro_batch_size"]) == (504, 36)
    assert plan["paper"]["num_micro_batches"] == 14


def test_plan_does_not_import_torch():
    code = ("import sys; from moe_lightning_cli import plan; plan.main(['--json', '--no-baselines']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("hardware, starts", [("t4-s1", "datasheet plus efficiency model"),
                                              ("l4-s2", "published: the MoE-Lightning paper"),
                                              ("h200-measured", "measured on the profiled machine")])
def test_plan_states_the_basis_of_its_rates(capsys, hardware, starts):
    rc, out, _ = run_plan(capsys, "--hardware", hardware, "--no-baselines", "--json")
    d = json.loads(out)
    assert rc == 0 and d["basis"].startswith(starts)
    assert d["uncertainty"] == load_profile(hardware).uncertainty()                   # the band of that basis
    rc, out, _ = run_plan(capsys, "--hardware", hardware, "--no-baselines")
    assert rc == 0 and "rates: " + starts in " ".join(out.split())
    assert "uncertainty: predictions on this basis missed by a median of" in " ".join(out.split())


def test_datasheet_flag_says_the_measurements_were_set_aside(capsys):
    rc, out, _ = run_plan(capsys, "--hardware", "h200-measured", "--no-baselines", "--datasheet", "--json")
    basis = json.loads(out)["basis"]
    assert rc == 0 and basis.startswith("datasheet plus efficiency model") and "measurements not used" in basis
