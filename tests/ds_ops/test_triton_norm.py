"""Triton LayerNorm/RMSNorm forward and backward on CPU tensors under TRITON_INTERPRET=1, against
torch.nn.functional (fp32: 1e-5; bf16 inputs: 2e-2 against fp32 math on the same values).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ds_ops import norm  # noqa: E402

FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture
def kernel(triton_kernels):
    return triton_kernels("norm")


def _case(rows, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(rows, n, generator=g).to(dtype)
    return x, w, b, dy


def _reference(fn, dy, *tensors):
    leaves = [t.detach().float().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.float())
    return y, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernels_match_torch(kernel, dtype, tol, affine):
    x, w, b, dy = _case(11, 40, dtype)  # 40: not a power of two; 11 rows over 4 backward programs
    w, b = (w, b) if affine else (None, None)
    y, mean, rstd = kernel.norm_fwd_launch(x, 40, w, b, 1e-5, rms=False)
    dx, dw, db = kernel.norm_bwd_launch(dy, x, 40, w, mean, rstd, rms=False, programs=4)
    ref_y, ref_grads = _reference(lambda x, w, b: F.layer_norm(x, (40,), w, b, 1e-5), dy, x, w, b)
    assert y.dtype == dtype and dx.dtype == dtype
    torch.testing.assert_close(y.float(), ref_y, **tol)
    torch.testing.assert_close(dx.float(), ref_grads[0], **tol)
    if affine:
        torch.testing.assert_close(dw, ref_grads[1], **tol)
        torch.testing.assert_close(db, ref_grads[2], **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_rms_norm_kernels_match_torch(kernel, dtype, tol):
    x, w, _, dy = _case(11, 40, dtype, seed=1)
    y, _, rstd = kernel.norm_fwd_launch(x, 40, w, None, 1e-6, rms=True)
    dx, dw, db = kernel.norm_bwd_launch(dy, x, 40, w, rstd, rstd, rms=True, programs=4)
    ref_y, (ref_dx, ref_dw) = _reference(lambda x, w: F.rms_norm(x, (40,), w, 1e-6), dy, x, w)
    assert db is None
    torch.testing.assert_close(y.float(), ref_y, **tol)
    torch.testing.assert_close(dx.float(), ref_dx, **tol)
    torch.testing.assert_close(dw, ref_dw, **tol)


def test_cuda_registrations_run_kernels(kernel):
    """The functions registered for "cuda", called on CPU tensors, launch the interpreted kernels and
    agree with the defaults (multi-dim normalized_shape, weight grads in the weight's shape)."""
    x, w, b, dy = _case(6, 20, torch.float32, seed=2)
    x, dy, w, b = x.view(6, 4, 5), dy.view(6, 4, 5), w.view(4, 5), b.view(4, 5)
    y, mean, rstd = norm._layer_norm_fwd_cuda(x, [4, 5], w, b, 1e-5)
    y_ref, mean_ref, rstd_ref = torch.ops.ds_ops.layer_norm_fwd(x, [4, 5], w, b, 1e-5)
    for ours, ref in ((y, y_ref), (mean, mean_ref), (rstd, rstd_ref)):
        torch.testing.assert_close(ours, ref, **FP32)
    grads = norm._layer_norm_bwd_cuda(dy, x, [4, 5], w, mean, rstd)
    grads_ref = torch.ops.ds_ops.layer_norm_bwd(dy, x, [4, 5], w, mean, rstd)
    for ours, ref in zip(grads, grads_ref):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, **FP32)
    y, rstd = norm._rms_norm_fwd_cuda(x, [4, 5], None, 1e-6)
    torch.testing.assert_close(y, torch.ops.ds_ops.rms_norm_fwd(x, [4, 5], None, 1e-6)[0], **FP32)
    grads = norm._rms_norm_bwd_cuda(dy, x, [4, 5], w, rstd)
    for ours, ref in zip(grads, torch.ops.ds_ops.rms_norm_bwd(dy, x, [4, 5], w, rstd)):
        torch.testing.assert_close(ours, ref, **FP32)
