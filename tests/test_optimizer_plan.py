"""Plan files: versioned JSON that round-trips, and that is rejected with a one-line PlanError when it is
malformed, foreign, of another version, or edited (spec hash)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from hrm.hardware import load_profile
from hrm.hf_config import load_model
from hrm.spec import Workload
from optimizer.plan import FORMAT, VERSION, Plan, PlanError, spec_sha256
from optimizer.search import search

MIXTRAL = load_model("mixtral-8x7b")


@pytest.fixture(scope="module")
def plan() -> Plan:
    return search(MIXTRAL, load_profile("h200"), Workload(77.0, 418, 128), gpu_memory="24GiB")


def test_round_trip(plan, tmp_path):
    again = Plan.from_json(plan.to_json())
    assert again == plan
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path) == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]      # no temporary file left behind


def test_contents(plan):
    d = json.loads(plan.to_json())
    assert d["format"] == FORMAT and d["version"] == VERSION
    assert d["model"]["spec_sha256"] == spec_sha256(MIXTRAL) and d["model"]["spec"]["hidden_size"] == 4096
    assert d["hardware"]["name"] == "h200" and d["hardware"]["gpu"]["memory_bytes"] > 0
    assert d["budgets"]["gpu_total_bytes"] == 24 * 2 ** 30
    e = plan.policy.resident_experts(8)
    assert d["placement"]["moe_layers"] == list(range(32))
    assert d["placement"]["resident_experts"] == [list(range(e))] * 32
    assert d["estimate"]["throughput_tok_s"] == pytest.approx(plan.throughput_tok_s)
    assert d["memory"]["gpu_bytes"] <= d["memory"]["gpu_budget_bytes"]
    for key in ("solver", "search_time_s", "toolkit_version", "created", "policy", "workload"):
        assert key in d


def _mutated(plan, fn) -> str:
    d = json.loads(plan.to_json())
    fn(d)
    return json.dumps(d)


@pytest.mark.parametrize("text,match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"format": "something-else", "version": 1}', "format"),
])
def test_rejects_garbage(text, match):
    with pytest.raises(PlanError, match=match) as e:
        Plan.from_json(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(version=VERSION + 1), "version"),
    (lambda d: d.pop("policy"), "policy"),
    (lambda d: d["policy"].update(batch_size=0), "batch_size"),
    (lambda d: d["model"]["spec"].update(hidden_size=5120), "sha256"),
    (lambda d: d["model"].update(spec_sha256="0" * 64), "sha256"),
    (lambda d: d["model"]["spec"].update(colour="blue"), "unknown key"),
    (lambda d: d["placement"]["resident_experts"].pop(), "resident-expert lists"),
    (lambda d: d["placement"].update(resident_experts=[[0, 0]] * 32), "distinct"),
    (lambda d: d["hardware"].pop("gpu"), "hardware"),
    (lambda d: d["workload"].update(gen_len=-3), "gen_len"),
    (lambda d: d.update(search_time_s=-1), "search_time_s"),
    (lambda d: d["estimate"]["policy"].update(kv_gpu_frac=0.5), "different policy"),
])
def test_rejects_malformed_or_edited(plan, mutate, match):
    with pytest.raises(PlanError, match=match) as e:
        Plan.from_json(_mutated(plan, mutate))
    assert "\n" not in str(e.value)


def test_rejects_plan_for_another_model(plan, tmp_path):
    path = plan.save(tmp_path / "p.json")
    other = dataclasses.replace(MIXTRAL, num_hidden_layers=16)
    with pytest.raises(PlanError, match="made for model"):
        Plan.load(path, spec=other)
    assert Plan.load(path, spec=MIXTRAL) == plan


def test_one_token_generation_round_trips():
    """gen_len = 1 has no decode step (decode rate NaN): written as null, read back."""
    p = search(MIXTRAL, load_profile("t4-s1"), Workload(77.0, 418, 1))
    text = p.to_json()
    assert "NaN" not in text and json.loads(text)["estimate"]["decode_tok_s"] is None
    assert Plan.from_json(text).policy == p.policy


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "nope.json")


def test_a_plan_written_before_the_rates_were_renamed_still_loads():
    """Plans from before 2026-12-02 name three measured rates without `_per_s` (hrm.hardware.MEASURED_RENAMED):
    the committed whole-model plans of that day load, with their GEMM curve under today's name."""
    from pathlib import Path

    path = (Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "whole_model" / "h200-2026-12-02-call1"
            / "keep" / "mixtral-8x7b-24GB-0-chosen.plan.json")
    assert '"gpu_gemm_flops"' in path.read_text()
    plan = Plan.load(path)
    assert plan.hardware.measured.gpu_gemm_flops_per_s and plan.policy.batch_size == 912
