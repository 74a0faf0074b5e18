"""Batch inference on a tiny real-format checkpoint with a real tokenizer: the text equals transformers'
greedy generate + decode, EOS and stop strings end a sequence, the JSONL job resumes to the same file,
bad input is one line, and a Hub id resolves from a local Hugging Face cache with the network off."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_text_model  # noqa: E402
from moe_lightning import LLM, Request, SamplingParams  # noqa: E402
from moe_lightning_cli.main import main  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model.build(tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' greedy continuation of a prompt's tokens, cut at EOS as generate does."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def ref(ids: list[int], max_new: int) -> list[int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return out[0, len(ids):].tolist()
    return tok, ref


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, progress=False) as llm:
        yield llm


def test_greedy_text_equals_transformers_generate_and_decode(llm, reference):
    tok, ref = reference
    max_tokens = [6, 6, 3, 6, 5]
    outs = llm.generate(tiny_text_model.PROMPTS, [SamplingParams(max_tokens=m) for m in max_tokens])
    reasons = set()
    for prompt, m, c in zip(tiny_text_model.PROMPTS, max_tokens, outs):
        ids = tok(prompt)["input_ids"]
        expected = ref(ids, m)
        assert c.text == tok.decode(expected, skip_special_tokens=True)
        assert list(c.token_ids) == expected
        assert (c.prompt_tokens, c.completion_tokens) == (len(ids), len(expected))
        ended = expected[-1] == tok.eos_token_id
        assert c.finish_reason == ("stop" if ended else "length")
        reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}        # the checkpoint's EOS is one the model emits


def test_chat_messages_go_through_the_template(llm, reference):
    tok, ref = reference
    messages = [{"role": "user", "content": "hello there , how are you"}]
    [c] = llm.chat([messages], SamplingParams(max_tokens=5))
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    assert c.prompt_tokens == len(ids)
    assert c.text == tok.decode(ref(ids, 5), skip_special_tokens=True)


def test_a_stop_string_ends_the_text(llm, reference):
    tok, ref = reference
    prompt = tiny_text_model.PROMPTS[1]
    full = ref(tok(prompt)["input_ids"], 6)
    stop = tok.decode(full[3:4])                  # the fourth generated word
    text = tok.decode(full, skip_special_tokens=True)
    [c] = llm.generate([Request("s", prompt=prompt, params=SamplingParams(max_tokens=6, stop=(stop,)))])
    assert c.finish_reason == "stop"
    assert c.text == text[:text.find(stop)]
    assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])


def _requests(path: Path, n: int = 5) -> Path:
    lines = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(tiny_text_model.PROMPTS[:n])]
    lines[min(2, n - 1)]["max_tokens"] = 3
    lines.append({"id": "chat", "messages": [{"role": "user", "content": "hello"}], "stop": ["purple"]})
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return path


def test_generate_jsonl_and_resume_after_an_interruption(model_dir, tmp_path, monkeypatch, capsys):
    import moe_lightning.outputs as outputs
    reqs = _requests(tmp_path / "in.jsonl")
    args = ["generate", "--model", str(model_dir), "-i", str(reqs), "--max-tokens", "6", "--batch-size", "2", "-q"]
    assert main(args + ["-o", str(tmp_path / "whole.jsonl")]) == 0
    whole = (tmp_path / "whole.jsonl").read_text()
    rows = [json.loads(line) for line in whole.splitlines()]
    assert sorted(r["id"] for r in rows) == ["chat", "r0", "r1", "r2", "r3", "r4"]
    assert set(rows[0]) == {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
    assert next(r for r in rows if r["id"] == "r2")["completion_tokens"] <= 3

    append = outputs.append_completions
    calls = []

    def interrupted(path, completions):
        append(path, completions)
        calls.append(len(completions))
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(outputs, "append_completions", interrupted)
    part = tmp_path / "part.jsonl"
    assert main(args + ["-o", str(part)]) == 130
    lines = part.read_text().splitlines()
    assert 0 < len(lines) < len(rows) and all(json.loads(line) for line in lines)   # a valid, partial file
    monkeypatch.setattr(outputs, "append_completions", append)
    assert main(args + ["-o", str(part)]) == 0
    assert part.read_text() == whole
    assert main(args + ["-o", str(part)]) == 0          # nothing left: the file stays as it is
    assert part.read_text() == whole


@pytest.mark.parametrize("line, words", [
    ('{"id": 1, "prompt": "a", "colour": "red"}', ["in.jsonl:2", "unknown field 'colour'"]),
    ('{"id": 0, "prompt": "a"}', ["in.jsonl:2", "id '0' repeats line 1"]),
    ('{"id": 1, "prompt": "a"', ["in.jsonl:2", "not valid JSON"]),
    ('{"id": 1, "prompt": "a", "max_tokens": 0}', ["in.jsonl:2", "max_tokens"]),
    ('{"id": 1, "prompt": "a", "top_p": 2}', ["in.jsonl:2", "top_p"]),
    ('{"id": 1, "prompt": "a", "messages": []}', ["in.jsonl:2", "exactly one of 'prompt' and 'messages'"]),
    ('{"id": 1, "prompt": "a", "max_tokens": 100000}', ["request '1'", "max_position_embeddings"]),
])
def test_bad_requests_are_one_line(model_dir, tmp_path, capsys, line, words):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 0, "prompt": "the fox"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dir), "-i", str(src), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()


def test_a_foreign_output_file_is_refused(model_dir, tmp_path, capsys):
    src = _requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "r0", "answer": 1}\n')
    assert main(["generate", "--model", str(model_dir), "-i", str(src), "-o", str(out), "-q"]) == 2
    assert "out.jsonl:1" in capsys.readouterr().err
    assert out.read_text() == '{"id": "r0", "answer": 1}\n'


def _hf_cache(home: Path, repo_id: str, files: Path) -> None:
    """The Hugging Face cache layout: blobs, a snapshot of links to them, refs/main."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in files.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy2(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_resolves_from_the_local_cache_offline(model_dir, tmp_path):
    _hf_cache(tmp_path / "hf", "tiny-org/tiny-text-moe", model_dir)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    cli = [sys.executable, "-m", "moe_lightning_cli.main"]
    reqs = _requests(tmp_path / "in.jsonl", n=2)
    r = subprocess.run(cli + ["generate", "--model", "tiny-org/tiny-text-moe", "-i", str(reqs), "-o",
                              str(tmp_path / "out.jsonl"), "--max-tokens", "4", "-q"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local.jsonl"
    assert main(["generate", "--model", str(model_dir), "-i", str(reqs), "-o", str(local), "--max-tokens", "4",
                 "-q"]) == 0
    assert (tmp_path / "out.jsonl").read_text() == local.read_text()
    r = subprocess.run(cli + ["plan", "--json", "--no-baselines", "--model", "tiny-org/not-cached"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stderr and r.stderr.count("\n") == 1


def _plan_json(capsys, *args) -> dict:
    assert main(["plan", "--json", "--no-baselines", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_takes_the_workload_from_a_dataset_and_prices_the_job(model_dir, reference, tmp_path, capsys):
    tok, _ = reference
    reqs = tmp_path / "in.jsonl"
    reqs.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(tiny_text_model.PROMPTS)))
    lens = [len(tok(p)["input_ids"]) for p in tiny_text_model.PROMPTS]
    d = _plan_json(capsys, "--dataset", str(reqs), "--tokenizer", str(model_dir), "--gen-len", "32")
    w, est = d["plan"]["workload"], d["plan"]["estimate"]
    assert (w["avg_prompt_len"], w["max_prompt_len"], w["gen_len"]) == (pytest.approx(sum(lens) / len(lens)), max(lens), 32)
    n, one_pass = d["plan"]["policy"]["batch_size"], est["prefill_s"] + est["decode_s"]
    assert d["job"]["passes"] == 1 and d["job"]["num_requests"] == len(lens) and n > len(lens)
    assert d["job"]["seconds"] < one_pass                 # 5 prompts cost less than a pass of N

    # 5 N prompts: the same lengths (cycled), so the same plan, and five full passes each priced as the plan
    k = 5 * n
    d = _plan_json(capsys, "--dataset", str(reqs), "--tokenizer", str(model_dir), "--gen-len", "32",
                   "--num-prompts", str(k))
    assert d["plan"]["policy"]["batch_size"] == n
    job = d["job"]
    assert (job["num_requests"], job["passes"], job["generated_tokens"]) == (k, 5, 32 * k)
    assert job["seconds"] == pytest.approx(5 * one_pass, rel=0.01)


def test_plan_dataset_needs_a_tokenizer(tmp_path, capsys):
    reqs = tmp_path / "in.jsonl"
    reqs.write_text('{"id": 0, "prompt": "the fox"}\n')
    assert main(["plan", "--dataset", str(reqs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer" in err


def test_generate_with_int8_experts_follows_the_dequantized_model(model_dir):
    """--expert-dtype int8 on a real-format checkpoint: quantized at load; each completion is the reference
    model's greedy continuation over the dequantized experts (cut at EOS as the engine cuts it)."""
    from runtime.model import greedy_generate
    with LLM(model_dir, progress=False, expert_dtype="int8") as q:
        outs = q.generate(tiny_text_model.PROMPTS, SamplingParams(max_tokens=5))
        store, spec = q.engine().store, q.spec
        assert spec.dtypes.expert_format == "int8" and store.offloaded.dtype == torch.uint8
        for prompt, c in zip(tiny_text_model.PROMPTS, outs):
            ids = q.encode([Request(id="r", prompt=prompt)])[0]
            want = greedy_generate(ids, 5, store.dense, store.at_rest, spec)
            assert list(c.token_ids) == want[:len(c.token_ids)] and c.token_ids


def test_generate_refuses_a_plan_of_several_gpus_in_one_line(model_dir, tmp_path, capsys):
    """generate runs on one GPU: a 2-GPU plan is refused (it runs with `run` under torchrun), nothing written."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 0, "prompt": "the fox"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dir), "-i", str(src), "-o", str(out), "-q",
                 "--hardware", "2xt4-s6"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 GPUs: generate runs on one GPU" in err, err
    assert not out.exists()
