"""ds_ops::quantize_blockwise / dequantize_blockwise defaults (plain PyTorch, no Triton needed).

Stated bound: |x - dequantize(quantize(x))| <= absmax(block) / qmax / 2 per element, qmax = 127
(int8) or 7 (int4), plus float32 rounding of the scale and product (checked with a margin of 1e-6 * absmax).
"""

import pytest
import torch

from ds_ops.quant import (
    QMAX,
    dequantize_blockwise_reference,
    error_bound,
    quantize,
    quantize_blockwise_reference,
)


def _roundtrip_error(x, block_size, bits):
    q, absmax = torch.ops.ds_ops.quantize_blockwise(x, block_size, bits)
    out = torch.ops.ds_ops.dequantize_blockwise(q, absmax, list(x.shape), block_size, bits, torch.float32)
    n = x.numel()
    blocks = -(-n // block_size)
    err = torch.nn.functional.pad((x.float() - out).abs().reshape(-1), (0, blocks * block_size - n))
    return err.view(blocks, block_size).amax(dim=1), absmax


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_error_within_half_a_step(bits, block_size, dtype):
    g = torch.Generator().manual_seed(block_size + bits)
    # blocks of very different magnitude, and a length that leaves a partial last block
    x = (torch.randn(9, 131, generator=g) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)
    err, absmax = _roundtrip_error(x, block_size, bits)
    assert (err <= error_bound(absmax, bits) + 1e-6 * absmax).all()
    # and the bound is not loose: some element is at least a quarter step off
    assert (err > error_bound(absmax, bits) / 2).any()


def test_codes_layout_int8_and_int4():
    x = torch.tensor([1.0, -1.0, 0.5, 0.0, -0.25])
    q8, a8 = quantize_blockwise_reference(x, 16, 8)
    assert q8.dtype == torch.int8 and q8.tolist() == [127, -127, 64, 0, -32] and a8.tolist() == [1.0]
    q4, a4 = quantize_blockwise_reference(x, 16, 4)
    # codes 7, -7, 4 (3.5 rounds up), 0, -2 (-1.75 rounds to -2); stored +8, even element low nibble
    assert q4.dtype == torch.uint8 and q4.shape == (3,)
    assert q4.tolist() == [15 | (1 << 4), 12 | (8 << 4), 6 | (8 << 4)]
    assert torch.equal(
        dequantize_blockwise_reference(q4, a4, [5], 16, 4), torch.tensor([1.0, -1.0, 4 / 7, 0.0, -2 / 7])
    )


def test_zero_blocks_and_empty_tensors_are_exact():
    x = torch.zeros(100)
    x[64:] = torch.linspace(-2, 2, 36)
    for bits in QMAX:
        q, absmax = torch.ops.ds_ops.quantize_blockwise(x, 64, bits)
        assert absmax[0] == 0 and absmax[1] == 2
        out = torch.ops.ds_ops.dequantize_blockwise(q, absmax, [100], 64, bits, torch.float32)
        assert torch.equal(out[:64], x[:64])
        q, absmax = torch.ops.ds_ops.quantize_blockwise(torch.zeros(0, 3), 64, bits)
        assert q.numel() == 0 and absmax.numel() == 0


def test_quantized_blocks_keep_shape_dtype_and_are_smaller():
    x = torch.randn(32, 48, dtype=torch.bfloat16)
    for bits, ratio in ((8, 0.54), (4, 0.29)):  # (1 or 1/2 byte + 4/64) / 2 bytes
        qb = quantize(x, 64, bits)
        back = qb.dequantize()
        assert back.shape == x.shape and back.dtype == torch.bfloat16
        assert qb.nbytes() < ratio * x.numel() * x.element_size()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 100}, "block_size=100 must be a power of two"),
        ({"bits": 2}, "bits=2 is not supported"),
    ],
)
def test_bad_arguments_name_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.ds_ops.quantize_blockwise(torch.randn(8), kwargs.get("block_size", 64), kwargs.get("bits", 8))


def test_ops_pass_opcheck():
    x = torch.randn(3, 50)
    for bits in QMAX:
        torch.library.opcheck(torch.ops.ds_ops.quantize_blockwise.default, (x, 32, bits))
        q, absmax = torch.ops.ds_ops.quantize_blockwise(x, 32, bits)
        torch.library.opcheck(
            torch.ops.ds_ops.dequantize_blockwise.default, (q, absmax, [3, 50], 32, bits, torch.bfloat16)
        )
