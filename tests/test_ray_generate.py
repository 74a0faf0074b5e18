"""`generate --replicas K` on a local Ray cluster of 2 CPUs: 2 replicas of the tiny real-format model over 60
prompts (greedy and sampled, two lengths) give one replica's completions, in input order; a replica that dies
mid-job (after finishing a pass, its results lost) still leaves the complete, identical file; without Ray the
flag is one line."""
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_text_model  # noqa: E402
from moe_lightning_cli.main import main  # noqa: E402

NUM_PROMPTS = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model.build(tmp_path_factory.mktemp("tiny-ray"))


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    """60 prompts from the corpus's words; every fourth sampled at temperature 0.8, every seventh 3 tokens."""
    words = " ".join(tiny_text_model.CORPUS).split()
    lines = []
    for i in range(NUM_PROMPTS):
        start = (3 * i) % len(words)
        d = {"id": f"q{i}", "prompt": " ".join(words[start:start + 2 + i % 5])}
        if i % 4 == 1:
            d["temperature"] = 0.8
        if i % 7 == 3:
            d["max_tokens"] = 3
        lines.append(d)
    path = tmp_path_factory.mktemp("ray-in") / "in.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import logging
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=False)
    yield ray
    ray.shutdown()


def _args(model_dir, src, out, *extra, quiet=True):
    return ["generate", "--model", str(model_dir), "-i", str(src), "-o", str(out), "--max-tokens", "6",
            "--batch-size", "8", *(["-q"] if quiet else []), *extra]


@pytest.fixture(scope="module")
def single(model_dir, requests_file, tmp_path_factory):
    """The one-replica run's completions by id (its file is in pass order)."""
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    assert main(_args(model_dir, requests_file, out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["id"]: r for r in rows}


def _in_input_order(single: dict) -> str:
    return "".join(json.dumps(single[f"q{i}"], ensure_ascii=False) + "\n" for i in range(NUM_PROMPTS))


def test_two_replicas_give_one_replicas_output_in_input_order(model_dir, requests_file, single, ray_cluster,
                                                             tmp_path, capsys):
    assert len(single) == NUM_PROMPTS
    assert {r["finish_reason"] for r in single.values()} == {"stop", "length"}
    out = tmp_path / "ray.jsonl"
    assert main(_args(model_dir, requests_file, out, "--replicas", "2", quiet=False)) == 0
    err = capsys.readouterr().err
    assert out.read_text() == _in_input_order(single)
    assert "2 replicas answered" in err, err          # both actors ran passes (8 passes of N <= 8 and the tails)


def test_a_replica_dying_mid_job_loses_and_repeats_nothing(model_dir, requests_file, single, ray_cluster,
                                                          tmp_path, monkeypatch):
    from moe_lightning.ray_generate import FAULT_ENV
    mark = tmp_path / "fault-fired"
    monkeypatch.setenv(FAULT_ENV, str(mark))
    out = tmp_path / "ray.jsonl"
    out.write_text(json.dumps(single["q4"]) + "\n")      # a resumed job: q4 (greedy) is not run again
    assert main(_args(model_dir, requests_file, out, "--replicas", "2")) == 0
    assert mark.exists()                                 # a replica exited after its pass, its rows lost
    lines = out.read_text().splitlines()
    assert lines[0] == json.dumps(single["q4"]) and len(lines) == NUM_PROMPTS
    expected = _in_input_order(single).splitlines()
    assert lines[1:] == [line for line in expected if json.loads(line)["id"] != "q4"]


def test_without_ray_replicas_is_one_line(model_dir, requests_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)        # `import ray` raises ImportError
    out = tmp_path / "out.jsonl"
    assert main(_args(model_dir, requests_file, out, "--replicas", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Ray, which is not installed" in err and "moe-lightning[ray]" in err, err
    assert not Path(out).exists()


def test_a_replica_refuses_a_batch_that_is_not_one_whole_pass(model_dir, requests_file):
    """Block = pass is what keeps samples as one replica's: a batch cut across passes is an error, not a
    different sample."""
    import numpy as np

    from moe_lightning.ray_generate import Replica, ReplicaConfig, pass_blocks
    from moe_lightning.llm import Batch
    from moe_lightning.requests import Request, SamplingParams
    from hrm.spec import Workload
    reqs = [Request(f"r{i}", prompt=p, params=SamplingParams(max_tokens=4)) for i, p in enumerate(tiny_text_model.PROMPTS)]
    rep = Replica(ReplicaConfig(model=str(model_dir), plan=None, workload=Workload(5.0, 8, 4), replicas_per_node=2))
    ids = rep.llm.encode(reqs)
    [block] = pass_blocks([Batch(3, tuple(range(5)), reqs[0].params)], reqs, ids)
    whole = {k: np.asarray(list(block[k]), dtype=object if k in ("request", "prompt_ids") else None) for k in block}
    got = rep(whole)
    assert [json.loads(c)["id"] for c in got["completion"]] == [r.id for r in reqs]
    assert rep.llm.plan.hardware.name.endswith("(1 of 2 replicas)")     # its own plan, on its share
    part = {k: v[:3] for k, v in whole.items()}
    with pytest.raises(RuntimeError, match="not one whole pass of 5"):
        rep(part)


@pytest.mark.parametrize("address, words", [("127.0.0.1:1", "no Ray cluster answers there"),
                                            ("nohost", "expected auto, HOST:PORT")])
def test_a_ray_address_that_does_not_answer_is_one_line(model_dir, requests_file, tmp_path, capsys, address, words):
    pytest.importorskip("ray.data")
    out = tmp_path / "out.jsonl"
    assert main(_args(model_dir, requests_file, out, "--ray-address", address)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not out.exists()
