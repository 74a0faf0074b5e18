"""The fused CPU decode-attention kernel at the shapes it is tuned for (d = 128, groups of 4 and 8: Mixtral's
and Qwen3-30B-A3B's), over bf16, int8 and fp8 caches, with bf16 and fp32 queries: equal to fp64 SDPA over the
values the cache holds, on a context that ends mid-tile and ranges that start and end inside tiles (the
slot-by-slot path), an empty range (zeros) and full ones (the 4-slot tiles)."""
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import runtime.cpu_attention as ca  # noqa: E402
import runtime.cpu_attention_fused as fused  # noqa: E402
from hrm.formats import kv_format  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.available(), reason="needs numba")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _case(n_kv, group, fmt, dtype, batch=6, t=37, cap=44, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_kv * group, d, generator=g).to(dtype)
    k, v = (torch.randn(batch, n_kv, cap, d, generator=g).to(torch.bfloat16) for _ in range(2))
    if fmt != "bf16":
        k, v = (ca.quantize_kv(x, kv_format(fmt)) for x in (k, v))
    starts = torch.tensor([0, 3, 0, 5, 2, 9])[:batch]
    ends = torch.tensor([t, 3, t - 2, 30, t, 10])[:batch]       # full, empty, mid-tile ends and starts
    return q, k, v, ca.attention_mask(starts, ends, t)


@pytest.mark.parametrize("n_kv,group", [(8, 4), (4, 8)], ids=["mixtral", "qwen3"])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_equals_sdpa_at_the_tuned_shapes(n_kv, group, fmt, dtype):
    q, k, v, mask = _case(n_kv, group, fmt, dtype)
    t = mask.shape[-1]
    kv = [x.dequantize(torch.float64) if fmt != "bf16" else x.double() for x in (k, v)]
    b, n_q, d = q.shape
    ref = F.scaled_dot_product_attention(q.double().view(b, n_kv, group, d), kv[0][:, :, :t], kv[1][:, :, :t],
                                         attn_mask=mask).reshape(b, n_q * d)
    ref[1] = 0.0                                                 # an empty range gives zeros, as SDPA does
    out = fused.decode_attention_fused(q, k, v, mask)
    assert out.dtype == dtype and out.shape == ref.shape
    assert float((out.double() - ref).abs().max()) < TOL[dtype]
    assert float(out[1].abs().max()) == 0.0
