"""The Triton kernels compiled for a real CUDA device, against their PyTorch references.

Marked ``cuda``: skipped (with the reason) where no CUDA device is visible. ``nox -s gpu`` and
``benchmarks/gpu/run.py`` run them with ``TRITON_INTERPRET=0`` so Triton compiles each kernel for the
device instead of interpreting it. Inputs are fresh random data at sizes that span many programs,
outputs are poisoned before each launch so an unwritten element fails, and references run in fp32
or float64 on the same inputs.

Tolerances: Adam follows the same fp32 formula (IEEE sqrt/div) as ``torch.optim.AdamW``, so 1e-6
absolute / 1e-5 relative; quantize codes are equal bit for bit (same arithmetic); norms in fp32
within 1e-5 relative of the float64 reference, bf16 within 2 bf16 ulps.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def compiled():
    """The Triton kernel modules, compiled (not interpreted) for the CUDA device."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would interpret the kernels; run with TRITON_INTERPRET=0 "
                    "(as `nox -s gpu` does) to compile them for the device")
    import ds_ops.triton as ds_triton

    if not ds_triton.available():
        pytest.fail(f"a CUDA device is here but the Triton kernels are not: {ds_triton.unavailable_reason()}")
    from ds_ops.triton import adam, norm, quant

    return {"adam": adam, "norm": norm, "quant": quant}


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16])
def test_fused_adam_compiles_and_matches_adamw(compiled, model_dtype):
    shapes = [(4097,), (333, 129), (1 << 20,), (7,)]
    params = [_randn(s, i) for i, s in enumerate(shapes)]
    grads = [_randn(s, 100 + i) for i, s in enumerate(shapes)]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=True)
    model = [torch.full_like(p, float("nan"), dtype=model_dtype) for p in params] if model_dtype else []
    for step in range(1, 4):
        for r, g in zip(ref, grads):
            r.grad = g
        opt.step()
        compiled["adam"].fused_adam_launch(params, grads, exp_avgs, exp_avg_sqs, model, step, lr=1e-2,
                                           beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r.detach(), atol=1e-6, rtol=1e-5)
    for w, p in zip(model, params):  # the 16-bit copy is the fp32 master rounded to nearest
        assert torch.equal(w, p.to(model_dtype))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [64, 256])
def test_quantize_blockwise_compiles_and_equals_default(compiled, bits, block_size):
    from ds_ops.quant import dequantize_blockwise_reference, quantize_blockwise_reference

    x = _randn((37, 4099), bits + block_size) * torch.logspace(-2, 2, 4099, device="cuda")
    q, absmax = compiled["quant"].quantize_blockwise_launch(x, block_size, bits)
    q_ref, absmax_ref = quantize_blockwise_reference(x, block_size, bits)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    for dtype in (torch.float32, torch.bfloat16):
        out = compiled["quant"].dequantize_blockwise_launch(q, absmax, list(x.shape), block_size, bits, dtype)
        ref = dequantize_blockwise_reference(q, absmax, list(x.shape), block_size, bits, torch.float32)
        assert out.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(out, ref)
        else:
            assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_forward_backward_compiles_and_matches_torch(compiled, rms, dtype):
    from ds_ops import norm

    rows, hidden = 1031, 4096
    x = _randn((rows, hidden), 1, dtype).requires_grad_()
    w = (1 + 0.1 * _randn((hidden,), 2)).to(dtype).requires_grad_()
    b = (0.1 * _randn((hidden,), 3)).to(dtype).requires_grad_()
    dy = _randn((rows, hidden), 4, dtype)
    if rms:
        ours = norm.rms_norm(x, hidden, w, 1e-6)
    else:
        ours = norm.layer_norm(x, hidden, w, b, 1e-5)
    ours.backward(dy)
    grads = [x.grad, w.grad] + ([] if rms else [b.grad])

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.rms_norm(x64, (hidden,), w64, 1e-6) if rms else F.layer_norm(x64, (hidden,), w64, b64, 1e-5)
    ref.backward(dy.double())
    ref_grads = [x64.grad, w64.grad] + ([] if rms else [b64.grad])

    tol = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2 * 2.0**-7)}[dtype]
    torch.testing.assert_close(ours.double(), ref, **tol)
    for got, want in zip(grads, ref_grads):
        # weight/bias gradients sum over 1031 rows: the absolute tolerance grows with sqrt(rows)
        scale = 1.0 if got.shape == x.shape else rows ** 0.5
        torch.testing.assert_close(got.double(), want, atol=tol["atol"] * scale, rtol=tol["rtol"])
