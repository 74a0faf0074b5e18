"""Bad input never crashes and never destroys a file (issue 14).

Every case is a real broken file or value given to the console script's entry point, grouped by the
boundary that must refuse it: CLI values, config.json, hardware profile TOML, plan JSON, --policy-json,
prompts file, checkpoint, outputs. Each must exit non-zero with exactly one stderr line naming the problem,
no traceback, and leave the directory it works in exactly as it was (no partial, temporary or replaced
file). A few run as subprocesses: a closed or full stdout, Ctrl-C during the MILP, a traceback-free exit.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_lightning_cli.main import main

TINY = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50, "num_experts": 3, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "dtype": "float32",
        "max_position_embeddings": 64}
TINY_WORKLOAD = ["--hardware", "h200", "--gpu-memory", "1GiB", "--prompt-len", "6", "--max-prompt-len", "9",
                 "--gen-len", "4", "--no-baselines"]
GOOD = b"the good file that was there before\n"
ROOT = os.geteuid() == 0


# ---------------------------------------------------------------------------------------------------
# the workspace each case builds its broken files in

class Work:
    def __init__(self, root: Path, assets: dict):
        self.root, self.assets = root, assets

    def file(self, name: str, content) -> str:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(p)

    def dir(self, name: str) -> str:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return str(self.root / name)

    def config(self, text: str | None = None, **fields) -> str:
        """A model directory whose config.json is TINY with `fields` (None: removed), or `text`."""
        cfg = {k: v for k, v in {**TINY, **fields}.items() if v is not None}
        self.file("model/config.json", text if text is not None else json.dumps(cfg))
        return str(self.root / "model")

    def profile(self, edit=None, text: str | None = None) -> str:
        """The h200 profile's TOML with a regex edit (pattern, replacement) or replaced by `text`."""
        body = self.assets["profile"]
        if edit is not None:
            body, n = re.subn(edit[0], edit[1], body, count=1, flags=re.M)
            assert n == 1, edit
        return self.file("box.toml", text if text is not None else body)

    def plan(self, mutate=None, text: str | None = None) -> str:
        d = json.loads(self.assets["plan"])
        if mutate is not None:
            mutate(d)
        return self.file("plan.json", text if text is not None else json.dumps(d))

    def checkpoint(self, mutate=None, config: dict | None = None) -> str:
        """A tiny safetensors checkpoint of TINY; mutate(tensors) edits the tensors before saving."""
        import torch
        from safetensors.torch import save_file
        tensors = {k: v.clone() for k, v in self.assets["tensors"].items()}
        if mutate is not None:
            mutate(tensors)
        d = self.root / "ckpt"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({**TINY, **(config or {})}))
        save_file(tensors, str(d / "model.safetensors"))
        assert all(t.dtype in (torch.float32, torch.int32) for t in tensors.values())
        return str(d)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torch

    from hrm.hardware import load_profile
    from hrm.hf_config import spec_from_hf_config
    from hrm.spec import Workload
    from optimizer.search import search
    from runtime.checkpoint import hub_layout

    spec = spec_from_hf_config(dict(TINY))
    plan = search(spec, load_profile("h200"), Workload(6.0, 9, 4), gpu_memory="1GiB")
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(t.shape, generator=g) * 0.1 for name, t in hub_layout(spec, set()).items()}
    return {"plan": plan.to_json(), "tensors": tensors, "profile": Path(load_profile("h200").path).read_text()}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(capsys, root: Path, argv: list[str], needle: str) -> str:
    """main(argv) exits non-zero with one stderr line holding `needle`, no traceback, nothing written."""
    capsys.readouterr()
    before = _snapshot(root)
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc != 0, (argv, out, err)
    assert len(lines) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("moe-lightning") and ": error: " in lines[0], err
    assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert _snapshot(root) == before, "a file was written, replaced or left behind"
    return lines[0]


def _cases(*groups):
    """(id, build(work) -> argv, needle) triples, ids prefixed by their group."""
    return [pytest.param(build, needle, id=f"{group}-{i:02d}-{needle[:24]}")
            for group, cases in groups for i, (build, needle) in enumerate(cases)]


# ---------------------------------------------------------------------------------------------------
# CLI values

def plan_args(*a):
    return lambda w: ["plan", "--no-baselines", *a]


def estimate_args(*a):
    return lambda w: ["estimate", *a]


def run_args(*a):
    return lambda w: ["run", "--plan", w.plan(), "--json", "--no-warmup", *a]


CLI = [
    (plan_args("--prompt-len", "inf"), "--prompt-len"), (plan_args("--prompt-len", "nan"), "finite"),
    (plan_args("--prompt-len", "-5"), "positive"), (plan_args("--prompt-len", "0"), "positive"),
    (plan_args("--prompt-len", "abc"), "expected a number"), (plan_args("--prompt-len", "1e400"), "finite"),
    (plan_args("--max-prompt-len", "0"), "--max-prompt-len"), (plan_args("--max-prompt-len", "-1"), "positive"),
    (plan_args("--max-prompt-len", "1.5"), "integer"), (plan_args("--max-prompt-len", "99999999999"), "at most"),
    (plan_args("--gen-len", "0"), "--gen-len"), (plan_args("--gen-len", "-3"), "--gen-len"),
    (plan_args("--gen-len", "1e3"), "integer"), (plan_args("--gen-len", "100000"), "max_position_embeddings"),
    (plan_args("--prompt-len", "500", "--max-prompt-len", "100"), "average prompt length 500"),
    (plan_args("--num-layers", "0"), "--num-layers"), (plan_args("--num-layers", "-2"), "--num-layers"),
    (plan_args("--num-prompts", "0"), "--num-prompts"),
    (plan_args("--gpu-memory", "1e30TB"), "1 EiB"), (plan_args("--gpu-memory", "lots"), "memory size"),
    (plan_args("--gpu-memory", "0GB"), "positive"), (plan_args("--gpu-memory=-1GB"), "memory size"),
    (plan_args("--gpu-memory", "12parsecs"), "memory size"), (plan_args("--cpu-memory", "0"), "positive"),
    (plan_args("--cpu-memory", "1e30TB"), "1 EiB"), (plan_args("--gpu-memory", "1KB"), "GPU budget"),
    (plan_args("--gpu-frac", "0"), "--gpu-frac"), (plan_args("--gpu-frac", "1.5"), "at most 1"),
    (plan_args("--gpu-frac", "nan"), "finite"), (plan_args("--cpu-frac", "-1"), "--cpu-frac"),
    (plan_args("--solver", "simplex"), "invalid choice"), (plan_args("--search", "fast"), "invalid choice"),
    (plan_args("--model", "no-such-model"), "no-such-model"), (plan_args("--hardware", "nowhere"), "nowhere"),
    (plan_args("--frobnicate"), "unrecognized arguments"),
    (lambda w: ["nonsense-command"], "invalid choice"),
    (estimate_args("-N", "0"), "--batch-size"), (estimate_args("-N", "-1"), "positive"),
    (estimate_args("--mu", "0"), "--micro-batch-size"), (estimate_args("-N", "4", "--mu", "8"), "micro_batch_size"),
    (estimate_args("--weights-gpu-frac", "1.5"), "at most 1"), (estimate_args("--weights-gpu-frac", "nan"), "finite"),
    (estimate_args("--kv-gpu-frac", "-0.1"), "--kv-gpu-frac"), (estimate_args("--attention", "tpu"), "invalid choice"),
    (estimate_args("--schedule", "warp"), "invalid choice"),
    (estimate_args("--schedule", "s4", "--attention", "cpu"), "schedule"),
    (estimate_args("-N", "inf"), "integer"),
    (run_args("--num-prompts", "0"), "--num-prompts"), (run_args("--gen-len", "0"), "--gen-len"),
    (run_args("--temperature", "-1"), "--temperature"), (run_args("--temperature", "nan"), "finite"),
    (run_args("--top-p", "0"), "--top-p"), (run_args("--top-p", "1.5"), "at most 1"),
    (run_args("--seed", "-1"), "--seed"), (run_args("--gpu-memory", "lots"), "memory size"),
    (run_args("--num-layers", "0"), "--num-layers"), (run_args("--prompt-len", "inf"), "finite"),
    (run_args("--max-prompt-len", "0"), "--max-prompt-len"),
    (run_args("--prompt-len", "20", "--max-prompt-len", "10"), "exceeds the maximum"),
    (run_args("--gen-len", "100", "--num-prompts", "2"), "max_position_embeddings 64"),
    (lambda w: ["run", "--model", "mixtral-8x7b"], "give --plan"),
]

# ---------------------------------------------------------------------------------------------------
# config.json -> ModelSpec (through plan --model DIR)


def cfg(text=None, **fields):
    return lambda w: ["plan", "--model", w.config(text, **fields), *TINY_WORKLOAD]


CONFIG = [
    (cfg('{"model_type": "qwen2_moe", "hidden_size": NaN}'), "NaN is not a JSON number"),
    (cfg('{"model_type": "qwen2_moe", "hidden_size": Infinity}'), "Infinity is not a JSON number"),
    (cfg(hidden_size=-32), "'hidden_size'"), (cfg(hidden_size="32"), "'hidden_size'"),
    (cfg(hidden_size=1e30), "at most"), (cfg(hidden_size=32.5), "'hidden_size'"), (cfg(hidden_size=True), "'hidden_size'"),
    (cfg(hidden_size=None), "missing field 'hidden_size'"), (cfg(num_hidden_layers=0), "num_hidden_layers"),
    (cfg(vocab_size=0), "vocab_size"), (cfg(num_experts=0), "num_experts"),
    (cfg(num_experts_per_tok=5), "top-k 5 exceeds 3 experts"), (cfg(num_key_value_heads=3), "not a multiple"),
    (cfg(rms_norm_eps=0), "rms_norm_eps"), (cfg(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (cfg(rope_theta=0), "rope_theta"), (cfg(rope_theta=-1.0), "rope_theta"), (cfg(rope_theta="big"), "'rope_theta'"),
    (cfg(max_position_embeddings=0), "max_position_embeddings"),
    (cfg(max_position_embeddings=8), "max_position_embeddings 8"),       # context 13 > 8
    (cfg(model_type=None), "model_type"), (cfg(model_type="llama"), "dense model"),
    (cfg(model_type="wizard_moe"), "unsupported model_type"), (cfg("[1, 2, 3]"), "expected a JSON object"),
    (cfg(""), "empty file"), (cfg("{not json"), "invalid JSON at line 1"), (cfg("[" * 100000), "nested too deeply"),
    (lambda w: ["plan", "--model", w.file("model/config.json", b'{"model_type": "\xff\xfe"}').rsplit("/", 1)[0],
                *TINY_WORKLOAD], "not UTF-8"),
    (lambda w: ["plan", "--model", w.dir("model/config.json").rsplit("/", 1)[0], *TINY_WORKLOAD], "config.json"),
    (cfg(rope_scaling=[1, 2]), "rope_scaling"), (cfg(dtype="float13"), "float13"),
    (cfg(tie_word_embeddings="yes"), "tie_word_embeddings"), (cfg(num_attention_heads=5), "head_dim"),
    (lambda w: ["plan", "--model", str(w.root / "absent" / "config.json"), *TINY_WORKLOAD], "unknown model"),
    (cfg(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
    (cfg(norm_topk_prob="no"), "norm_topk_prob"),
]

# ---------------------------------------------------------------------------------------------------
# profile TOML -> HardwareProfile (through plan --hardware FILE)


def prof(edit=None, text=None):
    return lambda w: ["plan", "--hardware", w.profile(edit, text), "--no-baselines", "--gpu-memory", "24GiB"]


PROFILE = [
    (prof((r"^h2d_gb_per_s = .*$", "h2d_gb_per_s = nan")), "h2d_gb_per_s"),
    (prof((r"^h2d_gb_per_s = .*$", "h2d_gb_per_s = inf")), "h2d_gb_per_s"),
    (prof((r"^h2d_gb_per_s = .*$", "h2d_gb_per_s = -1")), "positive"),
    (prof((r"^h2d_gb_per_s = .*$", "h2d_gb_per_s = 0")), "positive"),
    (prof((r"^h2d_gb_per_s = .*$", 'h2d_gb_per_s = "fast"')), "must be a number"),
    (prof((r"^d2h_gb_per_s = .*$", "d2h_gb_per_s = -12.5")), "d2h_gb_per_s"),
    (prof((r"^(memory_gi?b) = .*$", r"\1 = 1e30")), "at most"),
    (prof((r"^(memory_gi?b) = .*$", r"\1 = 0")), "positive"),
    (prof((r"^mem_gb_per_s = .*$", "mem_gb_per_s = -5")), "mem_gb_per_s"),
    (prof((r"^tflops = .*$", "tflops = { bf16 = nan }")), "tflops.bf16"),
    (prof((r"^tflops = .*$", "tflops = 5")), "tflops"),
    (prof((r"^count = .*$", "count = 1.5")), "count"),
    (prof((r"^count = .*$", "count = 0")), "count"),
    (prof((r"^cores = .*$", "cores = -1")), "cores"),
    (prof((r"^cores = .*$", "cores = 2.5")), "cores"),
    (prof((r"^cpu_dram_gb_per_s = .*$", "cpu_dram_gb_per_s = -1")), "cpu_dram_gb_per_s"),
    (prof((r"^cpu_dram_gb_per_s = .*$", "cpu_dram_gb_per_s = nan")), "cpu_dram_gb_per_s"),
    (prof((r"^cpu_attention_gb_per_s = .*$", 'cpu_attention_gb_per_s = "x"')), "cpu_attention_gb_per_s"),
    (prof((r"^\[gpu\]$", "[gpu]\nmemroy_gib = 3")), "memroy_gib"),
    (prof((r"^\[link\]$", "[lnk]")), "link"),
    (prof((r"^\[link\]\n(?:.*\n)*?source = .*$", "[link]\nh2d_gb_per_s = 1\nd2h_gb_per_s = 1")), "source"),
    (prof(text="[gpu\nname = 1"), "not valid TOML"),
    (prof(text="a = " + "[" * 50000 + "]" * 50000), "TOML"),
    (lambda w: ["plan", "--hardware", w.file("box.toml", b"name = \"\xff\"\n")], "not UTF-8"),
    (prof(text=""), "missing section"),
    (lambda w: ["plan", "--hardware", w.dir("dir.toml")], "dir.toml"),
    (prof((r"^\[measured\]$", "[memory]\ncuda_context_gib = -1\nsource = \"x\"\n\n[measured]")), "cuda_context_gib"),
    (prof((r"^gpu_gemm_tokens = \[", "gpu_gemm_tokens = [1, ")), "differ in length"),
    (prof((r"^gpu_gemm_tokens = .*$", "gpu_gemm_tokens = 5")), "gpu_gemm_tokens"),
    (prof((r"^gpu_gemm_tokens = \[", "gpu_gemm_tokens = [-4, ")), "positive"),
    (lambda w: ["plan", "--hardware", str(w.root / "absent.toml")], "not found"),
]

# ---------------------------------------------------------------------------------------------------
# plan JSON -> Plan (through run --plan FILE)


def plan_file(mutate=None, text=None):
    return lambda w: ["run", "--plan", w.plan(mutate, text), "--json", "--no-warmup"]


def at(*keys, value=None, drop=False):
    """A mutation setting d[k1][k2]... = value (or deleting it)."""
    def mutate(d):
        for k in keys[:-1]:
            d = d[k]
        if drop:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    return mutate


NAN = float("nan")
PLAN = [
    (plan_file(at("workload", "gen_len", value="4")), "workload.gen_len"),
    (plan_file(at("workload", "max_prompt_len", value=1000)), "max_position_embeddings 64"),
    (plan_file(at("policy", "batch_size", value=1.5)), "policy.batch_size"),
    (plan_file(at("policy", "batch_size", value=True)), "policy.batch_size"),
    (plan_file(at("policy", "batch_size", value=0)), "batch_size"),
    (plan_file(at("policy", "colour", value="blue")), "'colour'"),
    (plan_file(at("policy", "weights_gpu_frac", value=NAN)), "NaN is not a JSON number"),
    (plan_file(at("hardware", "link", "h2d_bytes_per_s", value=-1)), "h2d_bytes_per_s"),
    (plan_file(at("hardware", "link", "h2d_bytes_per_s", value=0)), "h2d_bytes_per_s"),
    (plan_file(at("hardware", "link", "d2h_bytes_per_s", value=float("inf"))), "Infinity"),
    (plan_file(at("hardware", "gpu", "peak_flops", "bf16", value="x")), "peak_flops.bf16"),
    (plan_file(at("hardware", "gpu", "count", value=0)), "count"),
    (plan_file(at("hardware", "cpu", "mem_bytes_per_s", value=-3.0)), "mem_bytes_per_s"),
    (plan_file(at("hardware", "measured", value=[1])), "hardware.measured"),
    (plan_file(at("hardware", "gpu", value=None)), "hardware.gpu"),
    (plan_file(at("budgets", "gpu_bytes", value=-1)), "gpu_bytes"),
    (plan_file(at("memory", "gpu_bytes", value="lots")), "memory.gpu_bytes"),
    (plan_file(at("estimate", "prefill_s", value="x")), "prefill_s"),
    (plan_file(at("estimate", "decode_layer_s", value=[1, 2])), "estimate breakdown"),
    (plan_file(at("estimate", "memory_bytes", "gpu", "kv_cache", value=-5)), "memory_bytes.gpu"),
    (plan_file(at("extra", value=1)), "'extra'"),
    (plan_file(at("format", value="pickle")), "format"), (plan_file(at("version", value=1)), "version"),
    (plan_file(at("model", "spec", "hidden_size", value=64)), "sha256"),
    (plan_file(at("model", "spec", "rope_theta", value="x")), "model.spec.rope_theta"),
    (plan_file(at("placement", "moe_layers", value="x")), "placement.moe_layers"),
    (plan_file(at("placement", "resident_experts", value=[[9]] * 2)), "placement"),
    (plan_file(at("search_time_s", value=-1)), "search_time_s"),
    (plan_file(at("workload", drop=True)), "workload"),
    (plan_file(text="{not json"), "invalid JSON"), (plan_file(text=""), "empty file"),
    (plan_file(text="[" * 100000), "nested too deeply"), (plan_file(text="[1, 2]"), "not a JSON object"),
    (lambda w: ["run", "--plan", w.file("plan.json", b"\x80\x81 not text"), "--json"], "not UTF-8"),
    (lambda w: ["run", "--plan", w.dir("plan.json"), "--json"], "is a directory"),
    (lambda w: ["run", "--plan", str(w.root / "absent.json"), "--json"], "not found"),
]

# ---------------------------------------------------------------------------------------------------
# --policy-json and the prompts file


def policy(text):
    return lambda w: ["run", "--model", w.config(), "--policy-json", text, "--json", "--no-warmup", "--gen-len", "2"]


def prompts(content):
    return lambda w: ["run", "--plan", w.plan(), "--prompts", w.file("prompts.json", content), "--json", "--no-warmup"]


POLICY_AND_PROMPTS = [
    (policy('{"batch_size": 3, "micro_batch_size": 2, "colour": 1}'), "'colour'"),
    (policy("[3, 2]"), "JSON object"), (policy('{"batch_size": "3", "micro_batch_size": 2}'), "batch_size"),
    (policy('{"batch_size": NaN, "micro_batch_size": 2}'), "NaN"),
    (policy('{"batch_size": 0, "micro_batch_size": 1}'), "batch_size"),
    (policy('{"batch_size": 2, "micro_batch_size": 3}'), "micro_batch_size"),
    (policy('{"batch_size": 2, "micro_batch_size": 2, "schedule": "warp"}'), "schedule"),
    (policy("{batch_size: 2}"), "invalid JSON"), (policy("[" * 100000), "nested too deeply"),
    (policy('{"batch_size": 2, "micro_batch_size": 2, "weights_gpu_frac": 2}'), "weights_gpu_frac"),
    (policy('{"micro_batch_size": 2}'), "batch_size"),
    (prompts("[[1, 2, -1]]"), "token id -1"), (prompts("[[1, 2, 50]]"), "token id 50"),
    (prompts("[[1, 10000000000000]]"), "token id 10000000000000"), (prompts("[[1, 2.5]]"), "token id 2.5"),
    (prompts("[[1, true]]"), "token id True"), (prompts('[[1, "a"]]'), "token id 'a'"),
    (prompts("[[1, 2], []]"), "prompt 1 is empty"), (prompts("[]"), "no prompts"), (prompts("{not json"), "invalid JSON"),
    (prompts(""), "empty file"), (prompts('{"prompt": [1]}'), "prompt 0"), (prompts("[[[1]]]"), "token id [1]"),
    (prompts("[1, 2]\n[3, oops]\n"), "line 2"), (prompts("[[1, NaN]]"), "NaN"),
    (prompts(json.dumps([[1] * 62])), "max_position_embeddings 64"), (prompts(b"\xff\xfe"), "not UTF-8"),
    (lambda w: ["run", "--plan", w.plan(), "--prompts", str(w.root / "absent.json"), "--json"], "not found"),
    (lambda w: ["run", "--plan", w.plan(), "--prompts", w.dir("prompts"), "--json"], "is a directory"),
]

# ---------------------------------------------------------------------------------------------------
# checkpoints (run --plan P --model-dir D)


def ckpt(mutate=None, config=None, after=None):
    def build(w):
        d = w.checkpoint(mutate, config)
        if after is not None:
            after(Path(d))
        return ["run", "--plan", w.plan(), "--model-dir", d, "--json", "--no-warmup"]
    return build


def _set(name, fn):
    return lambda t: t.__setitem__(name, fn(t[name]))


def _truncate(n):
    return lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:n])


def _index(text):
    def write(d):
        (d / "model.safetensors.index.json").write_text(text)
    return write


def _header_bytes(header: bytes):
    return lambda d: (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


def _replace_file_with_dir(d):
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()


W0 = "model.layers.0.mlp.experts.1.up_proj.weight"
CHECKPOINT = [
    (ckpt(after=_truncate(0)), "not a safetensors file"), (ckpt(after=_truncate(5)), "not a safetensors file"),
    (ckpt(after=_truncate(4000)), "truncated"), (ckpt(after=_truncate(-100)), "truncated or corrupt"),
    (ckpt(after=lambda d: (d / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip" * 10)),
     "not a safetensors file"),
    (ckpt(after=_header_bytes(b"not json at all")), "header"), (ckpt(after=_header_bytes(b"[1, 2]")), "header"),
    (ckpt(after=_header_bytes(b'{"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}')), "unknown dtype"),
    (ckpt(after=_header_bytes(b'{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}')), "shape"),
    (ckpt(after=_replace_file_with_dir), "is a directory"),
    (ckpt(after=_index('{"metadata": {}}')), "missing 'weight_map'"),
    (ckpt(after=_index('{"weight_map": [1]}')), "weight_map"), (ckpt(after=_index("{oops")), "invalid JSON"),
    (ckpt(after=_index('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}')), "not a file name"),
    (ckpt(after=_index('{"weight_map": {"model.norm.weight": "shard-2.safetensors"}}')), "missing"),
    (ckpt(after=lambda d: (_index('{"weight_map": {"model.norm.weight": "shard"}}')(d), (d / "shard").mkdir())),
     "is a directory"),
    (ckpt(_set(W0, lambda t: t.index_fill(0, __import__("torch").tensor([3]), float("nan")))), W0),
    (ckpt(_set("model.norm.weight", lambda t: t.fill_(float("inf")))), "model.norm.weight"),
    (ckpt(config={"rope_theta": 1e6}), "rope_theta"), (ckpt(config={"rms_norm_eps": 1e-3}), "rms_norm_eps"),
    (ckpt(config={"norm_topk_prob": True}), "norm_topk_prob"),
    (ckpt(lambda t: t.pop("model.norm.weight")), "missing"),
    (ckpt(_set("model.norm.weight", lambda t: t[:-1].clone())), "mis-shaped"),
    (ckpt(_set("model.norm.weight", lambda t: t.to(__import__("torch").int32))), "not float"),
    (lambda w: ["run", "--plan", w.plan(), "--model-dir", str(w.root / "absent"), "--json"], "not found"),
]

# ---------------------------------------------------------------------------------------------------
# outputs: the good file that was there survives every failure


def _good(w, name):
    return w.file(name, GOOD)


OUTPUTS = [
    (lambda w: ["plan", "--no-baselines", "-o", w.dir("out")], "Is a directory"),
    (lambda w: ["plan", "--no-baselines", "--plot", w.dir("fig.png")], "Is a directory"),
    (lambda w: ["plan", "--no-baselines", "-o", "/dev/full"], "No space left on device"),
    (lambda w: ["plan", "--no-baselines", "-o", _good(w, "plan.json"), "--plot", str(w.root / "fig.nope")],
     "nope"),                                                                          # plan.json not replaced
    (lambda w: ["plan", "--no-baselines", "-o", _good(w, "file") + "/plan.json"], "not a directory"),
    (lambda w: ["estimate", "--plot", w.dir("fig.png")], "Is a directory"),
    (lambda w: ["run", "--plan", w.plan(), "--json", "--no-warmup", "-o", w.dir("m.json")], "Is a directory"),
    (lambda w: ["run", "--plan", w.plan(), "--json", "--no-warmup", "--trace", w.dir("t.json")], "Is a directory"),
    (lambda w: ["run", "--plan", w.plan(), "--json", "--no-warmup", "--timeline", w.dir("t.png")], "Is a directory"),
    (lambda w: ["run", "--plan", w.plan(), "--json", "--no-warmup", "--num-prompts", "2", "-o", _good(w, "m.json"),
                "--trace", _good(w, "t.json"), "--timeline", str(w.root / "t.nope")], "nope"),
    (lambda w: ["run", "--plan", w.plan(), "--json", "--no-warmup", "--num-prompts", "2", "-o", "/dev/full"],
     "No space left on device"),
]


@pytest.mark.parametrize("build, needle", _cases(("cli", CLI), ("config", CONFIG), ("profile", PROFILE),
                                                 ("plan", PLAN), ("input", POLICY_AND_PROMPTS),
                                                 ("checkpoint", CHECKPOINT), ("output", OUTPUTS)))
def test_bad_input_is_one_line_and_writes_nothing(build, needle, tmp_path, assets, capsys):
    work = Work(tmp_path, assets)
    argv = build(work)
    refused(capsys, tmp_path, argv, needle)


def test_the_battery_is_large():
    assert sum(map(len, (CLI, CONFIG, PROFILE, PLAN, POLICY_AND_PROMPTS, CHECKPOINT, OUTPUTS))) >= 150


@pytest.mark.skipif(ROOT, reason="root writes into read-only directories")
def test_read_only_directory_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, tmp_path, ["plan", "--no-baselines", "-o", str(ro / "plan.json")], "Permission denied")
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------------
# valid controls: the same builders without the fault pass and write their files

def test_valid_controls_pass(tmp_path, assets, capsys):
    w = Work(tmp_path, assets)
    out, fig = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["plan", "--model", w.config(), *TINY_WORKLOAD, "-o", str(out), "--plot", str(fig)]) == 0
    assert out.read_text().startswith("{") and fig.stat().st_size > 0
    assert main(["plan", "--hardware", w.profile(), "--no-baselines", "--gpu-memory", "24GiB", "--json"]) == 0
    m, trace = tmp_path / "m.json", tmp_path / "trace.json"
    assert main(["run", "--plan", w.plan(), "--model-dir", w.checkpoint(), "--prompts",
                 w.file("p.json", "[[1, 2, 3]]\n"), "--json", "--no-warmup", "-o", str(m), "--trace", str(trace)]) == 0
    assert json.loads(m.read_text())["num_sequences"] == 1 and json.loads(trace.read_text())
    assert main(["run", "--model", w.config(), "--policy-json", '{"batch_size": 2, "micro_batch_size": 1}',
                 "--json", "--no-warmup", "--gen-len", "2", "--prompts", w.file("p.jsonl", "[1, 2]\n[3]\n")]) == 0
    leftovers = [p.name for p in tmp_path.rglob(".*.tmp")]
    assert leftovers == []
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------
# as a user runs it: separate processes

CLI_CMD = [sys.executable, "-m", "moe_lightning_cli.main"]


def _run(args, **kw):
    return subprocess.run(CLI_CMD + args, capture_output=True, text=True, timeout=120, **kw)


def test_subprocess_bad_config_has_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "hidden_size": NaN}')
    r = _run(["plan", "--model", str(tmp_path)])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "NaN" in r.stderr and "Traceback" not in r.stderr


def test_subprocess_debug_shows_the_traceback(tmp_path):
    r = _run(["plan", "--model", str(tmp_path / "absent"), "--debug"])
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_subprocess_closed_stdout_ends_quietly():
    p = subprocess.Popen(CLI_CMD + ["plan", "--no-baselines"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()                                   # as `| head -c 10`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert err == "" and p.returncode in (0, 1, 141)       # 0 when all of it fitted in the pipe before the close


def test_subprocess_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        r = subprocess.run(CLI_CMD + ["plan", "--no-baselines"], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "moe-lightning plan: error: cannot write stdout: No space left on device"]


def test_subprocess_ctrl_c_during_the_milp_leaves_no_temp_files(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_bytes(GOOD)
    env = {**os.environ, "TMPDIR": str(tmp), "TMP": str(tmp)}
    p = subprocess.Popen(CLI_CMD + ["plan", "--solver", "milp", "--model", "qwen3-30b-a3b", "--no-baselines",
                                    "-o", str(out / "plan.json")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp.glob("moe-lightning-cbc-*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if p.poll() is not None:
        pytest.skip("the solve ended before it could be interrupted")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == "moe-lightning plan: interrupted"
    assert list(tmp.iterdir()) == []
    assert [f.name for f in out.iterdir()] == ["plan.json"] and (out / "plan.json").read_bytes() == GOOD
