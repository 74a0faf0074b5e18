"""Our checkpoint loader + reference model == transformers' float32 forward, on tiny random checkpoints
written by `save_pretrained` (odd sizes: hidden 48, 3 kv heads x 2 groups, 3 experts, top-2)."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hrm.hf_config import spec_from_hf_config  # noqa: E402
from runtime.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from runtime.model import forward  # noqa: E402
from runtime.weights import WeightStore  # noqa: E402
from oracles import HF_FAMILIES, hf_tiny_model  # noqa: E402

torch.set_num_threads(1)
MAX_REL_ERR = 1e-4
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in HF_FAMILIES:
        d = tmp_path_factory.mktemp(family)
        model = hf_tiny_model(family)
        model.save_pretrained(d, max_shard_size="40KB" if family == "qwen2_moe" else "1GB")
        out[family] = (d, model)
    return out


def _logits_ours(d, spec=None, num_resident=1):
    spec = spec or spec_from_hf_config(d)
    store = WeightStore(spec, torch.float32, "cpu", num_resident=num_resident, num_pages=2)
    load_checkpoint(d, store, progress=False)
    tokens = torch.tensor([3, 17, 99, 42, 0, 7, 64, 5, 88, 23, 11, 100, 2])
    return forward(tokens, store.dense, store.at_rest, spec), tokens


def _rel_err(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_logits_match_transformers(checkpoints, family):
    d, model = checkpoints[family]
    ours, tokens = _logits_ours(d)
    with torch.no_grad():
        ref = model(tokens[None]).logits[0]
    assert _rel_err(ours, ref) < MAX_REL_ERR


def test_sharded_checkpoint_is_sharded(checkpoints):
    d, _ = checkpoints["qwen2_moe"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2


def test_fused_expert_layout_loads_the_same(checkpoints, tmp_path):
    """transformers' in-memory layout: experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I]."""
    d, _ = checkpoints["mixtral"]
    spec = spec_from_hf_config(d)
    with safe_open(d / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fused = {}
    for k, t in tensors.items():
        if ".experts." in k:
            continue
        fused[k.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts."
        w = lambda e, n: tensors[f"{p}{e}.{n}.weight"]  # noqa: E731
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w(e, "w1"), w(e, "w3")]) for e in range(spec.num_experts)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [w(e, "w2") for e in range(spec.num_experts)])
    save_file(fused, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ours_fused, _ = _logits_ours(tmp_path, spec)
    ours, _ = _logits_ours(d, spec, num_resident=2)
    assert torch.equal(ours_fused, ours)


def test_bf16_checkpoint_converts_into_fp32_store(checkpoints, tmp_path):
    d, model = checkpoints["qwen3_moe"]
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    spec = spec_from_hf_config(tmp_path)
    store = WeightStore(spec, torch.float32, "cpu", num_resident=0)
    load_checkpoint(tmp_path, store, progress=False)
    ref = model.model.layers[1].mlp.experts.down_proj[2].to(torch.bfloat16).float()
    assert torch.equal(store.target("layers.1.experts.2.down"), ref)


def _rewrite(src, dst, edit):
    with safe_open(src / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
     ["1 missing", "model.layers.1.block_sparse_moe.experts.2.w3.weight"]),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}),
     ["1 unexpected", "model.layers.0.extra.weight"]),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 47)}),
     ["1 mis-shaped", "model.layers.0.self_attn.k_proj.weight [24, 47] != [24, 48]"]),
])
def test_bad_checkpoint_names_the_tensors(checkpoints, tmp_path, edit, words):
    d, _ = checkpoints["mixtral"]
    _rewrite(d, tmp_path, edit)
    spec = spec_from_hf_config(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, WeightStore(spec, torch.float32, "cpu", 0), progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_many_missing_tensors_are_summarised(checkpoints, tmp_path):
    d, _ = checkpoints["mixtral"]
    _rewrite(d, tmp_path, lambda t: [t.pop(k) for k in list(t) if ".experts." in k])
    spec = spec_from_hf_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"18 missing: .* \(\+13 more\)"):
        load_checkpoint(tmp_path, WeightStore(spec, torch.float32, "cpu", 0), progress=False)


def test_engine_greedy_matches_transformers_generate(checkpoints):
    d, model = checkpoints["qwen2_moe"]
    spec = spec_from_hf_config(d)
    prompts = [[5, 9, 33, 2, 71], [8, 1, 90]]
    with Engine(spec, Policy(2, 1), model_dir=d, dtype=torch.float32) as engine:
        tokens, _ = engine.generate(prompts, max_new_tokens=5)
    for prompt, ours in zip(prompts, tokens):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert ours == ref[0, len(prompt):].tolist()
