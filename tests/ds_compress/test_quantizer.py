"""The shared group-wise quantizer and the ds-quant packing, against the format page's definitions."""

import pytest
import torch

from ds_compress.layers import moq_bits, quant_layout
from ds_compress.packing import pack, unpack
from ds_compress.quantizer import (
    QuantSpec,
    code_range,
    compute_qparams,
    decode,
    encode,
    fake_quantize,
    fake_quantize_activation,
    quantize_weight,
)

from . import _reference


@pytest.mark.parametrize("bits,symmetric,group_size", [(8, True, -1), (8, False, 32), (4, True, 32),
                                                       (4, False, 64), (3, True, 16)])
def test_round_to_nearest_is_within_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 128) * torch.rand(24, 1)
    spec = QuantSpec(bits, group_size, symmetric)
    qw = quantize_weight(w, spec)
    lo, hi = code_range(bits, symmetric)
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    step = qw.scales.repeat_interleave(128 // qw.scales.shape[1], 1)
    err = (qw.dequantize() - w).abs()
    assert bool((err <= step / 2 + 1e-6).all())  # nearest rounding: half a quantization step at most


def test_ternary_and_binary_codes():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    t = quantize_weight(w, QuantSpec(2, 32, True))
    assert set(t.codes.unique().tolist()) <= {-1, 0, 1}
    # the Ternary Weight Networks scale: mean magnitude above 0.7 * mean|w| (per group)
    g = w[:, :32].abs()
    above = g > 0.7 * g.mean(1, keepdim=True)
    assert torch.allclose(t.scales[:, 0], (g * above).sum(1) / above.sum(1))
    b = quantize_weight(w, QuantSpec(1, -1, True))
    assert set(b.codes.unique().tolist()) <= {0, 1}
    assert torch.allclose(b.dequantize().abs(), w.abs().mean(1, keepdim=True).expand_as(w))
    assert bool((torch.sign(b.dequantize()) == torch.where(w >= 0, 1.0, -1.0)).all())


def test_scales_are_stored_in_the_weight_dtype_and_decode_exactly():
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    qw = quantize_weight(w, QuantSpec(4, 32, False))
    assert qw.scales.dtype == qw.zeros.dtype == torch.bfloat16
    assert bool((qw.zeros == qw.zeros.round()).all())  # integer zero points, in code units
    again = encode(qw.dequantize(torch.float32), qw.scales, qw.zeros, qw.spec)
    assert torch.equal(again, qw.codes)  # decoded weights are on the grid: re-encoding is exact


def test_doc_packing_example_and_reference_unpacking():
    q = torch.tensor([[-3, 5]], dtype=torch.int16)
    assert pack(q, 4, True).tolist() == [[0xD5]]  # the example of docs/quantized-format.md
    torch.manual_seed(0)
    for bits, symmetric in [(4, True), (4, False), (2, True), (2, False), (1, True), (8, True), (8, False)]:
        lo, hi = code_range(bits, symmetric)
        q = torch.randint(lo, hi + 1, (5, 48), dtype=torch.int16)
        packed = pack(q, bits, symmetric)
        assert torch.equal(_reference.codes(packed, bits, symmetric, 48), q.long())
        assert torch.equal(unpack(packed, bits, symmetric, 48), q)


def test_fake_quantize_passes_the_gradient_straight_through():
    w = torch.randn(8, 32, requires_grad=True)
    out = fake_quantize(w, QuantSpec(4, 16, True))
    assert not torch.equal(out.detach(), w.detach())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(2, 3, 32, requires_grad=True)
    fake_quantize_activation(x, 8).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    spec = QuantSpec(4, -1, True)
    scales, zeros = compute_qparams(w, spec)
    mean = torch.stack([decode(encode(w, scales, zeros, spec, stochastic=True), scales, zeros, spec)
                        for _ in range(400)]).mean(0)
    step = scales.max()
    assert float((mean - w).abs().mean()) < 0.03 * float(step)  # nearest rounding errs ~0.25 step on average


def test_token_wise_activation_quantization():
    x = torch.tensor([[[1.0, -2.0, 0.5], [100.0, 1.0, -50.0]]])
    q = fake_quantize_activation(x, 8)
    # each token has its own scale: the small token keeps its resolution
    assert torch.allclose(q[0, 0], x[0, 0], atol=2.0 / 127 / 2 + 1e-6)
    assert torch.allclose(q[0, 1], x[0, 1], atol=100.0 / 127 / 2 + 1e-6)


def test_moq_schedule_and_quantize_groups_layout():
    # one bit less at period, 2*period, 4*period, ... down to the target (DeepSpeed's MoQ schedule)
    assert [moq_bits(8, 4, 10, s)[0] for s in (0, 9, 10, 19, 20, 39, 40, 80, 1000)] == [8, 8, 7, 7, 6, 6, 5, 4, 4]
    assert quant_layout(64, 128, 1, "x") == (-1, 64)     # one scale for the matrix
    assert quant_layout(64, 128, 64, "x") == (-1, 1)     # one per row
    assert quant_layout(64, 128, 128, "x") == (64, 1)    # two per row
    w = torch.randn(4, 8)
    s, _ = compute_qparams(w, QuantSpec(8, -1, True), row_block=4)
    assert torch.allclose(s, (w.abs().max() / 127).expand(4, 1))
