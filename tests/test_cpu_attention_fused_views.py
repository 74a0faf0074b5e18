"""The fused CPU attention reads a view of a cache block's first slots as the whole contiguous block it is a
view of (numba compiles strided views without vectors), and never beyond the block's storage."""
from __future__ import annotations

import pytest
import torch

from hrm.formats import kv_format
from runtime import cpu_attention_fused as fused
from runtime.cpu_attention import decode_attention_sdpa, quantize_kv

pytestmark = pytest.mark.skipif(not fused.available(), reason="needs numba")


def test_a_slot_prefix_view_is_read_as_its_block():
    block = torch.randn(3, 2, 40, 16).bfloat16()
    view = block[:, :, :29]
    whole = fused._as_block(view)
    assert whole.is_contiguous() and whole.shape == block.shape and whole.data_ptr() == block.data_ptr()
    rows = fused._as_block(block[1:, :, :29])                   # the last rows: their block ends the storage
    assert rows.is_contiguous() and rows.shape == (2, 2, 40, 16) and rows.data_ptr() == block[1:].data_ptr()
    scale = quantize_kv(block, kv_format("int8"))[:, :, :29].scale
    assert fused._as_block(scale).is_contiguous() and fused._as_block(scale).shape == (3, 2, 40)


@pytest.mark.parametrize("make", [lambda b: b.transpose(1, 2), lambda b: b[:, :1, :29], lambda b: b[:, :, 3:29],
                                  lambda b: b[..., :8]])
def test_other_views_are_left_alone(make):
    view = make(torch.randn(3, 2, 40, 16).bfloat16())
    assert fused._as_block(view) is view


def test_a_view_past_the_end_of_its_storage_is_left_alone():
    flat = torch.randn(2 * 2 * 40 * 16 - 16).bfloat16()         # one slot short of two whole blocks
    view = flat.as_strided((2, 2, 29, 16), (2 * 40 * 16, 40 * 16, 16, 1))
    assert fused._as_block(view) is view


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_the_output_over_a_view_is_the_blocks(fmt):
    torch.manual_seed(0)
    k, v = torch.randn(4, 2, 48, 32).bfloat16(), torch.randn(4, 2, 48, 32).bfloat16()
    q = torch.randn(4, 8, 32).bfloat16()
    mask = torch.ones(4, 1, 1, 37, dtype=torch.bool)
    mask[0, ..., :5] = False
    if fmt != "bf16":
        k, v = quantize_kv(k, kv_format(fmt)), quantize_kv(v, kv_format(fmt))
    whole = fused.decode_attention_fused(q, k, v, mask)
    assert torch.equal(fused.decode_attention_fused(q, k[:, :, :37], v[:, :, :37], mask), whole)
    if fmt == "bf16":
        ref = decode_attention_sdpa(q, k[:, :, :37], v[:, :, :37], mask)
        assert (whole.float() - ref.float()).abs().max() < 2e-2
