"""Quantized expert formats (hrm.formats, runtime.quant): packed bytes as priced, round to nearest, the
scale layouts (per output channel; per group of 128 inputs), and the GEMM from the packed form equal to
dequantize-then-matmul."""
from __future__ import annotations

import pytest
import torch

from hrm.formats import EXPERT_FORMATS, expert_format
from runtime.quant import dequantize, quantize, scaled_matmul, unpack

INT8, INT4 = EXPERT_FORMATS["int8"], EXPERT_FORMATS["int4"]


def _w(out_f, in_f, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("fmt", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("shape", [(5, 256), (24, 384), (1, 128)])
def test_packed_bytes_are_the_priced_bytes(fmt, shape):
    packed, scales = quantize(_w(*shape), fmt)
    assert packed.dtype == torch.uint8 and scales.dtype == torch.float16
    stored = packed.numel() * packed.element_size() + scales.numel() * scales.element_size()
    assert stored == fmt.matrix_bytes(*shape)


def test_bytes_per_weight_of_each_format():
    assert EXPERT_FORMATS["bf16"].bytes_per_weight(4096) == 2.0
    assert INT8.bytes_per_weight(4096) == pytest.approx(1 + 2 / 4096)
    assert INT4.bytes_per_weight(4096) == pytest.approx(0.5 + 2 / 128)
    with pytest.raises(ValueError, match="divisible by 128"):
        INT4.matrix_bytes(8, 200)
    with pytest.raises(ValueError, match="unknown expert format 'fp3'"):
        expert_format("fp3")


@pytest.mark.parametrize("fmt", [INT8, INT4], ids=["int8", "int4"])
def test_round_trip_is_within_half_a_step(fmt):
    w = _w(16, 512)
    packed, scales = quantize(w, fmt)
    back = dequantize(packed, scales, fmt, torch.float32)
    g = 512 if fmt.group == 0 else fmt.group
    step = scales.float().repeat_interleave(g, dim=1)                       # [out, in]: each weight's scale
    assert torch.all((back - w).abs() <= step / 2 + 1e-7)
    # the largest magnitude of each group is stored exactly at the end of the grid
    qmax = 127 if fmt.bits == 8 else 7
    q = unpack(packed, fmt)
    assert q.abs().max().item() == qmax and q.min().item() >= -qmax - 1


def test_values_on_the_grid_come_back_exactly_and_round_to_nearest():
    scale = 2.0 ** -8
    q = torch.randint(-7, 8, (4, 256), generator=torch.Generator().manual_seed(1)).float()
    q[:, ::128] = 7                                                          # each group's max is 7 steps
    w = q * scale
    packed, scales = quantize(w, INT4)
    assert torch.equal(unpack(packed, INT4).float(), q)
    assert torch.equal(dequantize(packed, scales, INT4, torch.float32), w)
    nudged = w.clone()                                                       # the group's max stays 7 steps
    nudged[0, 1], nudged[0, 2], nudged[0, 3] = 3.49 * scale, 2.51 * scale, -4.51 * scale
    got = unpack(quantize(nudged, INT4)[0], INT4)
    assert got[0, 1:4].tolist() == [3, 3, -5]


def test_scales_are_per_output_channel_for_int8_and_per_128_inputs_for_int4():
    w = _w(3, 256)
    w[1] *= 100                                                              # one loud row
    w[2, 128:] *= 100                                                        # one loud half-row
    s8, s4 = quantize(w, INT8)[1].float(), quantize(w, INT4)[1].float()
    assert s8.shape == (3, 1) and s4.shape == (3, 2)
    assert s8[1, 0] > 50 * s8[0, 0] and s8[2, 0] > 50 * s8[0, 0]
    assert s4[2, 1] > 50 * s4[2, 0] and s4[1, 0] > 50 * s4[0, 1] and s4[1, 1] > 50 * s4[0, 0]


@pytest.mark.parametrize("fmt", [INT8, INT4], ids=["int8", "int4"])
def test_the_gemm_from_packed_weights_equals_dequantize_then_matmul(fmt):
    w, x = _w(40, 384, seed=2), torch.randn(7, 384, generator=torch.Generator().manual_seed(3))
    packed, scales = quantize(w, fmt)
    reference = x @ dequantize(packed, scales, fmt, torch.float32).T
    torch.testing.assert_close(scaled_matmul(x, packed, scales, fmt), reference, rtol=1e-5, atol=1e-6)
    # and near the unquantized product: int8 within ~1%, int4 within ~15% (round to nearest, no calibration)
    exact = x @ w.T
    err = ((reference - exact).norm() / exact.norm()).item()
    assert err < (0.01 if fmt.bits == 8 else 0.15)


def test_an_all_zero_row_is_stored_and_comes_back_zero():
    w = _w(2, 128)
    w[0] = 0
    for fmt in (INT8, INT4):
        packed, scales = quantize(w, fmt)
        assert torch.all(dequantize(packed, scales, fmt, torch.float32)[0] == 0)
