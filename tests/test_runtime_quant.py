"""Routed experts stored int8 / int4 in the runtime: the store holds the quantized bytes, the pipeline
under many policies gives the reference model's tokens over the dequantized experts, the account equals
what it allocates, and a checkpoint loads into the quantized store as quantize(checkpoint)."""
import pytest

torch = pytest.importorskip("torch")

from hrm.formats import expert_format  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.spec import ModelSpec  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.model import greedy_generate  # noqa: E402
from runtime.quant import dequantize, quantize  # noqa: E402
from runtime.synthetic import synthesize  # noqa: E402
from runtime.weights import EXPERT_PARTS, WeightStore  # noqa: E402

torch.set_num_threads(1)

# widths divisible by int4's group of 128
TINY = ModelSpec(name="tiny-quant", model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=97, num_experts=5,
                 num_experts_per_tok=2, moe_intermediate_size=128, qk_norm=True, norm_topk_prob=True)
FORMATS = ("int8", "int4")
PROMPT_LENS = (5, 9, 3, 7, 12, 4, 8)
MAX_NEW = 5
POLICIES = [Policy(7, 2), Policy(7, 3, weights_gpu_frac=0.4), Policy(7, 7, weights_gpu_frac=1.0),
            Policy(7, 3, attention_on_gpu=True, schedule="s4"), Policy(7, 2, schedule="blocking")]


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _assert_each_expert_quantized(plain: WeightStore, quant: WeightStore, f) -> None:
    """Every expert matrix of `quant` is dequantize(quantize(w)) of the same matrix w of `plain`, exactly."""
    spec = plain.spec
    for layer in range(spec.num_hidden_layers):
        for e in range(spec.num_experts):
            want, got = plain.at_rest(layer)(e), quant.at_rest(layer)(e)
            for part in EXPERT_PARTS:
                w = getattr(want, part)
                assert torch.equal(getattr(got, part), dequantize(*quantize(w, f), f, w.dtype)), (layer, e, part)


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_holds_each_expert_quantized(fmt):
    """Synthetic experts: the quantized store's expert is dequantize(quantize(w)) of the bf16 store's w,
    exactly, and its bytes per expert are the format's (scales included)."""
    spec = TINY.with_expert_format(fmt)
    plain, quant = (WeightStore(s, torch.float64, "cpu", num_resident=2, num_pages=2) for s in (TINY, spec))
    synthesize(plain, seed=4, progress=False)
    synthesize(quant, seed=4, progress=False)
    f = expert_format(fmt)
    h, i = TINY.hidden_size, TINY.moe_intermediate_size
    assert quant.offloaded.shape[-1] == 2 * f.matrix_bytes(i, h) + f.matrix_bytes(h, i)
    assert quant.offloaded.dtype == torch.uint8
    _assert_each_expert_quantized(plain, quant, f)


@pytest.fixture(scope="module", params=FORMATS)
def reference(request):
    spec = TINY.with_expert_format(request.param)
    with Engine(spec, Policy(1, 1), dtype=torch.float64, seed=3, progress=False) as e:
        prompts = _prompts()
        return spec, prompts, [greedy_generate(p, MAX_NEW, e.store.dense, e.store.at_rest, spec) for p in prompts]


@pytest.mark.parametrize("policy", POLICIES, ids=[p.short() for p in POLICIES])
def test_quantized_pipeline_gives_the_reference_tokens(reference, policy):
    spec, prompts, expected = reference
    with Engine(spec, policy, dtype=torch.float64, seed=3, progress=False) as e:
        tokens, m = e.generate(prompts, MAX_NEW)
    assert tokens == expected
    held, acc = m.allocated_bytes["gpu"], m.account_bytes["gpu"]
    for part in ("resident_experts", "expert_double_buffer", "expert_dequant"):
        assert held[part] == pytest.approx(acc[part], rel=0.01, abs=1), part
    assert acc["expert_dequant"] == TINY.num_experts * 3 * 128 * 128 * 8       # [E, 3 I H] float64


def test_quantized_experts_shrink_the_account_by_the_format():
    """The experts' bytes in the account follow the format (int8 about half of bf16, int4 about a quarter);
    the dequantization workspace is one layer's experts in the compute dtype."""
    policy = Policy(7, 2)
    sizes = {}
    for fmt in ("bf16", "int8", "int4"):
        with Engine(TINY.with_expert_format(fmt), policy, dtype=torch.bfloat16, seed=0, progress=False) as e:
            sizes[fmt] = e.store.offloaded_bytes
            dequant = e.store.allocated_bytes()["expert_dequant"]
            assert dequant == (0 if fmt == "bf16" else TINY.num_experts * 3 * 128 * 128 * 2)
    assert sizes["int8"] / sizes["bf16"] == pytest.approx(0.5 + 2 / 128 / 2, rel=1e-6)
    assert sizes["int4"] / sizes["bf16"] == pytest.approx(0.25 + 2 / 128 / 2, rel=1e-6)


def test_a_checkpoint_loads_quantized(tmp_path):
    """load_checkpoint into an int8 store: each expert is quantize(the checkpoint's tensor), and the dense
    weights are as the checkpoint has them."""
    pytest.importorskip("transformers")
    from hrm.hf_config import spec_from_hf_config
    from runtime.checkpoint import load_checkpoint
    from oracles import hf_tiny_model

    hf_tiny_model("mixtral").save_pretrained(tmp_path)
    spec = spec_from_hf_config(tmp_path)
    plain, quant = (WeightStore(s, torch.float32, "cpu", num_resident=1, num_pages=2)
                    for s in (spec, spec.with_expert_format("int8")))
    for store in (plain, quant):
        load_checkpoint(tmp_path, store, progress=False)
    f = expert_format("int8")
    for name in plain.dense_names():
        assert torch.equal(plain.target(name), quant.target(name)), name
    _assert_each_expert_quantized(plain, quant, f)


def test_each_layer_is_dequantized_once_per_visit(reference, monkeypatch):
    """Four micro-batches, every expert streamed: a layer's experts are dequantized once per prefill layer
    and once per decode visit, not once per chunk or micro-batch."""
    import runtime.quant as quant
    spec, prompts, expected = reference
    calls = []
    real = quant.dequantize_experts
    monkeypatch.setattr(quant, "dequantize_experts", lambda *a: calls.append(1) or real(*a))
    with Engine(spec, Policy(7, 2), dtype=torch.float64, seed=3, progress=False) as e:
        tokens, _ = e.generate(prompts, MAX_NEW)
        calls.clear()
        tokens, _ = e.generate(prompts, MAX_NEW)
    assert tokens == expected
    assert len(calls) == spec.num_hidden_layers * MAX_NEW       # prefill: L; decode: L per step, MAX_NEW - 1 steps
