"""Post-training quantization judged by perplexity on the yardstick GPT (trained once, in ``_gpt``).

Bounds (measured on this yardstick: int8 RTN +0.001 %, int4 g64 RTN +0.8 %, int4 g64 GPTQ +0.2 %,
W8A8 ZeroQuant +0.02 %, ternary RTN +21 %, XTC ternary after 100 distillation steps +8 %):
- int8 RTN within 0.5 % of fp32;
- int4 group-64 GPTQ closer to fp32 than int4 group-64 RTN (the GPTQ paper's central claim);
- W8A8 ZeroQuant (group-64 int8 weights, per-token int8 activations) within 1 % of fp32, and W4A8
  with layer-by-layer distillation closer to fp32 than W4A8 without it;
- XTC ternary weights + distillation recover at least half of ternary RTN's perplexity gap.
"""

import copy

import pytest

from ds_compress import quantize

from . import _gpt


@pytest.fixture(scope="module")
def yardstick():
    model = _gpt.trained_gpt()
    return model, _gpt.perplexity(model)


def _ppl(model, method, **kwargs):
    return _gpt.perplexity(quantize(copy.deepcopy(model), method, **kwargs))


def test_int8_rtn_within_half_a_percent(yardstick):
    model, fp32 = yardstick
    assert fp32 < 0.5 * _gpt.VOCAB  # the yardstick learned the source (uniform would be 48)
    assert _ppl(model, "rtn", bits=8) <= fp32 * 1.005


def test_int4_gptq_beats_int4_rtn(yardstick):
    model, fp32 = yardstick
    rtn = _ppl(model, "rtn", bits=4, group_size=64)
    gptq = _ppl(model, "gptq", bits=4, group_size=64, calibration=_gpt.CALIB)
    assert rtn > fp32 * 1.002  # int4 costs something measurable here
    assert abs(gptq - fp32) < abs(rtn - fp32), (fp32, rtn, gptq)


def test_zeroquant_w8a8_and_lkd(yardstick):
    model, fp32 = yardstick
    assert _ppl(model, "zeroquant", bits=8, group_size=64) <= fp32 * 1.01
    plain = _ppl(model, "zeroquant", bits=4, group_size=64)
    lkd = _ppl(model, "zeroquant", bits=4, group_size=64, calibration=_gpt.CALIB, lkd_steps=40, lr=1e-4)
    assert abs(lkd - fp32) < abs(plain - fp32), (fp32, plain, lkd)


def test_xtc_ternary_with_distillation_recovers_half_the_gap(yardstick):
    model, fp32 = yardstick
    ternary = _ppl(model, "rtn", bits=2, group_size=64)
    data = [_gpt.batch(16, 3_000_000 + i)[0] for i in range(8)]
    xtc = _ppl(model, "xtc", bits=2, group_size=64, calibration=data, distill_steps=100, lr=1e-3)
    assert ternary > fp32 * 1.05
    assert xtc - fp32 <= 0.5 * (ternary - fp32), (fp32, ternary, xtc)
