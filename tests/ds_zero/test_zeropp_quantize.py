"""ZeRO++'s block quantization (ds_zero/quantize.py) against its definition, on one process."""

import pytest
import torch

from ds_zero.quantize import dequantize_rows, quantize_rows, row_bytes


@pytest.mark.parametrize("bits, block", [(8, 256), (4, 128)])
def test_round_trip_error_is_at_most_half_a_step_of_each_block(bits, block):
    torch.manual_seed(0)
    x = torch.randn(3, 1000) * torch.logspace(-3, 2, 1000)  # blocks of very different magnitudes
    q = quantize_rows(x, block, bits)
    assert q.dtype == torch.uint8 and q.shape == (3, row_bytes(1000, block, bits))
    y = dequantize_rows(q, 1000, block, bits)
    padded = torch.zeros(3, -(-1000 // block) * block)
    padded[:, :1000] = x
    step = padded.view(3, -1, block).abs().amax(2, keepdim=True) / (2 ** (bits - 1) - 1)
    err = (y - x).view(3, -1)
    bound = step.expand(-1, -1, block).reshape(3, -1)[:, :1000] / 2
    assert torch.all(err.abs() <= bound * (1 + 1e-6))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_are_symmetric_and_the_block_maximum_is_exact(bits):
    top = 2 ** (bits - 1) - 1
    x = torch.tensor([[-2.0, -1.0, 0.0, 0.5, 2.0, 1.0, 0.25, -0.25]])
    y = dequantize_rows(quantize_rows(x, 8, bits), 8, 8, bits)
    assert y[0, 0] == -2.0 and y[0, 4] == 2.0 and y[0, 2] == 0.0
    # every value is a whole number of steps of max/top
    steps = y / (2.0 / top)
    assert torch.allclose(steps, steps.round(), atol=1e-5, rtol=0)


def test_zero_blocks_dequantize_to_zeros_and_sizes_add_up():
    x = torch.zeros(2, 300)
    x[1, 290] = 3.0
    q = quantize_rows(x, 256)
    y = dequantize_rows(q, 300, 256)
    assert torch.equal(y, x)
    assert row_bytes(300, 256) == 2 * 256 + 2 * 4  # two blocks of int8 codes, two fp32 scales
    assert row_bytes(300, 128, 4) == 3 * 64 + 3 * 4  # three blocks of packed int4, three scales


def test_bf16_in_and_out():
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    y = dequantize_rows(quantize_rows(x, 256), 512, 256, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert (y.float() - x.float()).abs().max() <= x.float().abs().max() / 127


def test_bad_arguments_name_the_rule():
    with pytest.raises(ValueError, match="8 or 4 bits"):
        quantize_rows(torch.zeros(1, 4), 4, bits=2)
    with pytest.raises(ValueError, match="has 260 bytes, got 10"):
        dequantize_rows(torch.zeros(1, 10, dtype=torch.uint8), 5, 256)
