"""Triton blockwise quantize/dequantize against the default, on CPU tensors under TRITON_INTERPRET=1.

Kernel and default share the arithmetic (IEEE division, floor(y + 1/2)), so codes and absmax are
equal bit for bit; fp32 dequantized values too, bf16/fp16 outputs to one ulp (the interpreter
truncates fp32 -> bf16 where torch rounds to nearest).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton


import pytest  # noqa: E402
import torch  # noqa: E402

from ds_ops.quant import (  # noqa: E402
    _dequantize_blockwise_cuda,
    _quantize_blockwise_cuda,
    dequantize_blockwise_reference,
    quantize_blockwise_reference,
)


@pytest.fixture
def kernel(triton_kernels):
    return triton_kernels("quant")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [64, 128, 256])
@pytest.mark.parametrize("shape", [(3, 131), (5,)])
def test_kernel_codes_equal_default(kernel, bits, block_size, shape):
    g = torch.Generator().manual_seed(block_size)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])
    q, absmax = kernel.quantize_blockwise_launch(x, block_size, bits)
    q_ref, absmax_ref = quantize_blockwise_reference(x, block_size, bits)
    assert q.dtype == q_ref.dtype and torch.equal(q, q_ref)
    assert torch.equal(absmax, absmax_ref)
    out = kernel.dequantize_blockwise_launch(q, absmax, list(shape), block_size, bits, torch.float32)
    assert torch.equal(out, dequantize_blockwise_reference(q, absmax, list(shape), block_size, bits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_inputs_and_outputs(kernel, dtype):
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(3)).to(dtype)
    for bits in (8, 4):
        q, absmax = kernel.quantize_blockwise_launch(x, 64, bits)
        q_ref, absmax_ref = quantize_blockwise_reference(x, 64, bits)
        assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
        out = kernel.dequantize_blockwise_launch(q, absmax, [2, 100], 64, bits, dtype)
        ref = dequantize_blockwise_reference(q, absmax, [2, 100], 64, bits, torch.float32)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=1e-6, rtol=2**-7)


def test_cuda_registration_runs_kernel(kernel):
    """The functions registered for "cuda", called on CPU tensors, launch the interpreted kernels."""
    x = torch.randn(4, 40)
    q, absmax = _quantize_blockwise_cuda(x, 32, 4)
    assert torch.equal(q, quantize_blockwise_reference(x, 32, 4)[0])
    out = _dequantize_blockwise_cuda(q, absmax, [4, 40], 32, 4, torch.float32)
    assert torch.equal(out, dequantize_blockwise_reference(q, absmax, [4, 40], 32, 4))
    with pytest.raises(ValueError, match="block_size=48"):
        _quantize_blockwise_cuda(x, 48, 8)
