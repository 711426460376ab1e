"""ds_ops LayerNorm/RMSNorm ops (defaults, no Triton needed) against torch.nn.functional.

Tolerances: fp32 forward and grads within 1e-5 (atol and rtol); bf16 inputs against the fp32
reference on the same bf16 values within 2e-2 (bf16 keeps 8 bits of mantissa).
"""

import pytest
import torch
import torch.nn.functional as F

from ds_ops.norm import LayerNorm, RMSNorm, layer_norm, rms_norm

FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)


def _inputs(shape, normalized, dtype, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = torch.randn(normalized, generator=g).to(dtype).requires_grad_() if affine else None
    b = torch.randn(normalized, generator=g).to(dtype).requires_grad_() if affine else None
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


def _grads(out, dy, *tensors):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], dy)


def _ref_inputs(*tensors):
    return [t.detach().float().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", [((4, 3, 40), (40,)), ((6, 5, 8), (5, 8))])
def test_layer_norm_matches_torch(dtype, tol, affine, shape, normalized):
    x, w, b, dy = _inputs(shape, normalized, dtype, affine)
    y = layer_norm(x, normalized, w, b, eps=1e-5)
    rx, rw, rb = _ref_inputs(x, w, b)
    ry = F.layer_norm(rx, normalized, rw, rb, eps=1e-5)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ry, **tol)
    for ours, ref in zip(_grads(y, dy, x, w, b), _grads(ry, dy.float(), rx, rw, rb)):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), ref, **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", [((4, 3, 40), (40,)), ((6, 5, 8), (5, 8))])
def test_rms_norm_matches_torch(dtype, tol, affine, shape, normalized):
    x, w, _, dy = _inputs(shape, normalized, dtype, affine)
    y = rms_norm(x, normalized, w, eps=1e-6)
    rx, rw = _ref_inputs(x, w)
    ry = F.rms_norm(rx, normalized, rw, eps=1e-6)
    torch.testing.assert_close(y.float(), ry, **tol)
    for ours, ref in zip(_grads(y, dy, x, w), _grads(ry, dy.float(), rx, rw)):
        torch.testing.assert_close(ours.float(), ref, **tol)


def test_modules_load_torch_state_dicts_and_train():
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(16, 32), LayerNorm(32), torch.nn.Linear(32, 32), RMSNorm(32))
    ref = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 32), torch.nn.RMSNorm(32, eps=1e-6)
    )
    ref.load_state_dict(ours.state_dict())
    x, target = torch.randn(64, 16), torch.randn(64, 32)
    losses = []
    for model in (ours, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **FP32)


def test_wrong_shape_names_the_rule():
    with pytest.raises(ValueError, match=r"does not end in normalized_shape \(8,\)"):
        layer_norm(torch.randn(2, 6), [8])


def test_ops_pass_opcheck():
    x, w, b, _ = _inputs((3, 12), (12,), torch.float32)
    torch.library.opcheck(torch.ops.ds_ops.layer_norm_fwd.default, (x, [12], w, b, 1e-5))
    torch.library.opcheck(torch.ops.ds_ops.layer_norm_fwd.default, (x, [12], None, None, 1e-5))
    torch.library.opcheck(torch.ops.ds_ops.rms_norm_fwd.default, (x, [12], w, 1e-6))
    _, mean, rstd = torch.ops.ds_ops.layer_norm_fwd(x, [12], w, b, 1e-5)
    dy = torch.randn(3, 12)
    torch.library.opcheck(torch.ops.ds_ops.layer_norm_bwd.default, (dy, x.detach(), [12], w.detach(), mean, rstd))
    _, rstd = torch.ops.ds_ops.rms_norm_fwd(x, [12], w, 1e-6)
    torch.library.opcheck(torch.ops.ds_ops.rms_norm_bwd.default, (dy, x.detach(), [12], None, rstd))
