"""decode_attention takes the fused (numba) kernel for caches in host memory only: a cache on the GPU (attention
on the GPU, S4, or the micro-batches whose KV stays on the device) goes to the torch kernels. H200 call 44: an
OLMoE S4 plan ended in "can't convert cuda:0 device type tensor to numpy" once the fused kernel became bf16's
default. The meta device stands in for the GPU here: any tensor that is not on the CPU."""
import pytest
import torch

import runtime.cpu_attention as ca


def _bf16(device):
    q = torch.randn(3, 4, 8, dtype=torch.bfloat16, device=device)            # [B, n_q, d]
    k = torch.randn(3, 2, 10, 8, dtype=torch.bfloat16, device=device)        # [B, n_kv, T, d]
    return q, k, torch.randn_like(k), torch.ones(3, 1, 1, 10, dtype=torch.bool, device=device)


def _int8(device):
    q, _, _, mask = _bf16(device)
    kv = [ca.QuantKV(torch.zeros(3, 2, 10, 8, dtype=torch.int8, device=device),
                     torch.ones(3, 2, 10, dtype=torch.float32, device=device)) for _ in range(2)]
    return q, kv[0], kv[1], mask


@pytest.fixture
def fused_calls(monkeypatch):
    monkeypatch.setattr(ca, "DECODE_KERNEL", "fused")
    monkeypatch.setattr(ca, "QUANT_DECODE_KERNEL", "fused")
    calls = []

    def fake(q, k, v, mask):
        calls.append(q.device.type)
        return torch.zeros(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype)
    monkeypatch.setattr(ca.fused, "decode_attention_fused", fake)
    return calls


@pytest.mark.parametrize("case", [_bf16, _int8], ids=["bf16", "int8"])
def test_the_fused_kernel_reads_host_caches_only(fused_calls, case):
    q, k, v, mask = case("cpu")
    ca.decode_attention(q, k, v, None, None, 10, mask=mask)
    assert fused_calls == ["cpu"]
    q, k, v, mask = case("meta")
    out = ca.decode_attention(q, k, v, None, None, 10, mask=mask)
    assert fused_calls == ["cpu"] and out.device.type == "meta" and out.shape == (3, 32)


@pytest.mark.gpu
def test_gpu_cache_in_bf16_gives_the_host_kernels_result():
    q, k, v, mask = _bf16("cpu")
    host = ca.decode_attention(q, k, v, None, None, 10, mask=mask)
    gpu = ca.decode_attention(q.cuda(), k.cuda(), v.cuda(), None, None, 10, mask=mask.cuda())
    assert gpu.device.type == "cuda"
    assert float((gpu.cpu().float() - host.float()).abs().max()) <= 2e-2 * float(host.float().abs().max())
