"""The grouped MoE path's one-pass activation (runtime.swiglu_kernel) against silu(gate) * up * w."""
import pytest
import torch
import torch.nn.functional as F

from runtime import swiglu_kernel as sk


def _case(pairs: int, inter: int, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(pairs, 2 * inter, generator=g) * 3).to(device, dtype)
    w = torch.rand(pairs, generator=g).to(device)
    exact = (F.silu(gu[:, :inter].double()) * gu[:, inter:].double() * w[:, None].double())
    return gu, w, exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fallback_is_silu_gate_times_up_times_the_weight(dtype):
    gu, w, exact = _case(19, 40, dtype)
    a = sk.silu_mul_weighted(gu, w, 40)
    assert a.shape == (19, 40) and a.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert float((a.double() - exact).abs().max()) <= tol * float(exact.abs().max())


def test_no_fused_kernel_off_cuda():
    assert not sk.fused_available(torch.device("cpu"), torch.bfloat16)


def test_the_environment_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("MOE_LIGHTNING_SWIGLU_KERNEL", "0")
    monkeypatch.setattr(sk, "triton", object())          # as where Triton imports: the environment decides
    assert not sk.fused_available(torch.device("cuda", 0), torch.bfloat16)


needs_kernel = pytest.mark.skipif(not torch.cuda.is_available() or sk.triton is None,
                                  reason="needs a CUDA GPU and Triton")


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pairs, inter", [(0, 768), (1, 14336), (37, 1100), (4099, 768), (8192, 14336)])
def test_the_fused_kernel_equals_the_three_kernel_form(dtype, pairs, inter):
    dev = torch.device("cuda")
    assert sk.fused_available(dev, dtype)
    gu, w, exact = _case(pairs, inter, dtype, dev, seed=pairs)
    fused = sk._fused(gu, w, inter)
    ref = sk.silu_mul_weighted_reference(gu.clone(), w, inter)
    assert fused.shape == ref.shape == (pairs, inter) and fused.dtype == dtype
    if pairs:
        scale = float(exact.abs().max())
        # rounded once (fused) against three times (reference): the fused one is the closer to exact
        assert float((fused.double() - exact).abs().max()) <= 1e-2 * scale
        assert float((fused.double() - ref.double()).abs().max()) <= 2e-2 * scale
        assert float((fused.double() - exact).abs().mean()) <= float((ref.double() - exact).abs().mean())
