"""``ds_ops::woq_linear`` (weight-only quantized GEMM over ds-quant codes): every kernel against the
definition ``x @ dequantize(codes).T`` (docs/quantized-format.md), built here without ds_infer.

Tolerance: the kernels sum in another order (group partial sums, offsets folded per group), so
fp32 results differ from the reference by float rounding: 1e-4 relative to the output scale.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

from ds_ops.woq import (  # noqa: E402
    _woq_linear_cpu,
    _woq_linear_cuda,
    dequantize_codes,
    woq_linear_reference,
)


def quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Round-to-nearest codes in the stored layout, written from the format page."""
    out, cols = w.shape
    g = cols if group == -1 else group
    wg = w.view(out, cols // g, g)
    if bits == 1:
        scales = wg.abs().mean(-1)
        q, zeros = (wg > 0).to(torch.int16), None
    elif symmetric:
        qmax = 2 ** (bits - 1) - 1
        scales = wg.abs().amax(-1) / qmax
        q, zeros = torch.round(wg / scales[..., None]).clamp(-qmax, qmax).to(torch.int16), None
    else:
        top = 2**bits - 1
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scales = (hi - lo) / top
        zeros = torch.round(-lo / scales)
        q = torch.round(wg / scales[..., None] + zeros[..., None]).clamp(0, top).to(torch.int16)
    q = q.reshape(out, cols)
    if bits == 8:
        return q.to(torch.int8 if symmetric else torch.uint8), scales, zeros
    field = (q + (2 ** (bits - 1) if symmetric and bits > 1 else 0)).to(torch.uint8)
    per = 8 // bits
    field = field.view(out, cols // per, per)
    packed = torch.zeros(out, cols // per, dtype=torch.uint8)
    for j in range(per):
        packed |= field[:, :, j] << (j * bits)
    return packed, scales, zeros


CASES = [(8, -1, True), (8, 32, True), (8, 64, False), (4, 32, True), (4, 64, False), (4, 128, True),
         (2, 32, True), (2, 16, False), (1, 32, True)]


@pytest.mark.parametrize("bits,group,symmetric", CASES)
def test_codes_dequantize_to_the_weights_they_came_from(bits, group, symmetric):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits))
    q, s, z = quantize(w, bits, group, symmetric)
    deq = dequantize_codes(q, s, z, bits, group, symmetric, torch.float32)
    if bits == 8:  # half a step per element
        step = s.repeat_interleave(128 if group == -1 else group, dim=1)
        assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # the byte layout from the format page: 4-bit symmetric q = -3, 5 at columns 0, 1 -> 0xD5
    if bits == 4 and symmetric:
        q2 = torch.zeros(1, 128, dtype=torch.int16)
        q2[0, 0], q2[0, 1] = -3, 5
        field = (q2 + 8).to(torch.uint8).view(1, 64, 2)
        assert int(field[0, 0, 0] | (field[0, 0, 1] << 4)) == 0xD5


@pytest.mark.parametrize("bits,group,symmetric", CASES)
@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_cpu_kernel_matches_reference(bits, group, symmetric, rows):
    g = torch.Generator().manual_seed(rows * 31 + bits)
    w = torch.randn(40, 256, generator=g)
    q, s, z = quantize(w, bits, group, symmetric)
    x = torch.randn(rows, 256, generator=g)
    ref = woq_linear_reference(x, q, s, z, bits, group, symmetric)
    got = _woq_linear_cpu(x, q, s, z, bits, group, symmetric)
    torch.testing.assert_close(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_cpu_kernel_low_precision_activations():
    w = torch.randn(32, 128)
    q, s, _ = quantize(w, 4, 64, True)
    x = torch.randn(2, 128).to(torch.bfloat16)
    got = _woq_linear_cpu(x, q, s.to(torch.bfloat16), None, 4, 64, True)
    ref = woq_linear_reference(x.float(), q, s.to(torch.bfloat16).float(), None, 4, 64, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_registered_op_dispatches_and_checks_shapes():
    from ds_core.ops import get_op
    from ds_ops.registry import OpInputError

    op = get_op("woq_linear")
    assert op is not None
    w = torch.randn(16, 64)
    q, s, z = quantize(w, 8, 32, True)
    x = torch.randn(2, 64)
    torch.testing.assert_close(op(x, q, s, z, 8, 32, True), x @ dequantize_codes(q, s, z, 8, 32, True, x.dtype).T,
                               atol=1e-4, rtol=0)
    with pytest.raises(OpInputError, match="group_size 48 does not divide in_features 64"):
        op(x, q, s, z, 8, 48, True)
    with pytest.raises(OpInputError, match="bits=3"):
        op(x, q, s, z, 3, 32, True)


@pytest.mark.parametrize("bits,group,symmetric", [(8, -1, True), (8, 32, False), (4, 32, True), (4, 64, False),
                                                  (2, 32, True), (1, 32, True)])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_triton_kernel_matches_reference(triton_kernels, bits, group, symmetric, rows):
    triton_kernels("woq")
    g = torch.Generator().manual_seed(rows + bits)
    w = torch.randn(70, 128, generator=g)
    q, s, z = quantize(w, bits, group, symmetric)
    x = torch.randn(rows, 128, generator=g)
    ref = woq_linear_reference(x, q, s, z, bits, group, symmetric)
    got = _woq_linear_cuda(x, q, s, z, bits, group, symmetric)  # the "cuda" entry on CPU tensors: interpreted
    torch.testing.assert_close(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("bits,group", [(8, -1), (4, 64), (4, 128)])
def test_triton_kernel_compiles_on_cuda(bits, group):
    w = torch.randn(512, 1024)
    q, s, z = quantize(w, bits, group, True)
    x = torch.randn(4, 1024)
    ref = woq_linear_reference(x, q, s, z, bits, group, True)
    got = torch.ops.ds_ops.woq_linear(x.cuda().half(), q.cuda(), s.cuda().half(), None, bits, group, True)
    torch.testing.assert_close(got.float().cpu(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
