"""Fused LayerNorm and RMSNorm as ``ds_ops`` custom ops with autograd, and modules built on them.

Ops (``x`` is normalized over its trailing ``normalized_shape``; ``mean``/``rstd`` are fp32, one
per row, saved for backward):

- ``ds_ops::layer_norm_fwd(x, normalized_shape, weight?, bias?, eps) -> (y, mean, rstd)``
- ``ds_ops::layer_norm_bwd(dy, x, normalized_shape, weight?, mean, rstd) -> (dx, dw, db)``
- ``ds_ops::rms_norm_fwd(x, normalized_shape, weight?, eps) -> (y, rstd)``
- ``ds_ops::rms_norm_bwd(dy, x, normalized_shape, weight?, rstd) -> (dx, dw)``

Statistics and products are computed in fp32 whatever the input dtype; ``y``/``dx`` come back in
the input's dtype, ``dw``/``db`` in the weight's. The default is plain PyTorch; on "cuda" the Triton
kernels of :mod:`ds_ops.triton.norm` run (rows longer than 65536 use the default). Autograd is
registered on the forward ops, so :class:`LayerNorm` / :class:`RMSNorm` train like their
``torch.nn`` counterparts (first derivatives only).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import triton as _triton
from .registry import custom_op, register_kernel

__all__ = [
    "layer_norm_fwd",
    "layer_norm_bwd",
    "rms_norm_fwd",
    "rms_norm_bwd",
    "layer_norm",
    "rms_norm",
    "LayerNorm",
    "RMSNorm",
]


_KERNEL = "triton (ds_ops.triton.norm)"


def _rows(x: Tensor, normalized_shape: list[int], what: str) -> int:
    k = len(normalized_shape)
    if k == 0 or list(x.shape[x.dim() - k :]) != list(normalized_shape):
        raise ValueError(
            f"{what}: input of shape {tuple(x.shape)} does not end in normalized_shape "
            f"{tuple(normalized_shape)}; pass the trailing dimensions to normalize over"
        )
    return math.prod(normalized_shape)


def _use_triton(n: int) -> bool:
    if not _triton.available():
        return False
    from .triton.norm import MAX_N

    return n <= MAX_N


# --- defaults (pure PyTorch) --------------------------------------------------------------------


def _norm_fwd_reference(x, n, weight, bias, eps, rms):
    x2 = x.reshape(-1, n).float()
    if rms:
        mean = None
        xc = x2
    else:
        mean = x2.mean(dim=1)
        xc = x2 - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(dim=1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * weight.reshape(-1).float()
    if bias is not None:
        y = y + bias.reshape(-1).float()
    return y.to(x.dtype).reshape(x.shape), mean, rstd


def _norm_bwd_reference(dy, x, n, weight, mean, rstd, rms):
    x2 = x.reshape(-1, n).float()
    dy2 = dy.reshape(-1, n).float()
    xhat = (x2 if rms else x2 - mean[:, None]) * rstd[:, None]
    g = dy2 * weight.reshape(-1).float() if weight is not None else dy2
    dx = g - xhat * (g * xhat).mean(dim=1, keepdim=True)
    if not rms:
        dx = dx - g.mean(dim=1, keepdim=True)
    dx = (dx * rstd[:, None]).to(x.dtype).reshape(x.shape)
    return dx, (dy2 * xhat).sum(dim=0), None if rms else dy2.sum(dim=0)


def _grad_dtype(weight: Tensor | None, x: Tensor) -> torch.dtype:
    return weight.dtype if weight is not None else x.dtype


# --- LayerNorm ----------------------------------------------------------------------------------


@custom_op("layer_norm_fwd")
def layer_norm_fwd(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm forward: ``(y, mean, rstd)``, the same ``y`` as ``torch.nn.functional.layer_norm``."""
    n = _rows(x, normalized_shape, "layer_norm_fwd")
    return _norm_fwd_reference(x, n, weight, bias, eps, rms=False)


def _layer_norm_fwd_cuda(x, normalized_shape, weight, bias, eps):
    n = _rows(x, normalized_shape, "layer_norm_fwd")
    if not _use_triton(n):
        return _norm_fwd_reference(x, n, weight, bias, eps, rms=False)
    from .triton.norm import norm_fwd_launch

    return norm_fwd_launch(x, n, weight, bias, eps, rms=False)


@layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, normalized_shape, weight, bias, eps):
    rows = x.numel() // math.prod(normalized_shape)
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@custom_op("layer_norm_bwd")
def layer_norm_bwd(
    dy: Tensor, x: Tensor, normalized_shape: list[int], weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward: ``(dx, dw, db)``; ``dw``/``db`` have ``normalized_shape``."""
    n = _rows(x, normalized_shape, "layer_norm_bwd")
    dx, dw, db = _norm_bwd_reference(dy, x, n, weight, mean, rstd, rms=False)
    dtype = _grad_dtype(weight, x)
    return dx, dw.to(dtype).reshape(normalized_shape), db.to(dtype).reshape(normalized_shape)


def _layer_norm_bwd_cuda(dy, x, normalized_shape, weight, mean, rstd):
    n = _rows(x, normalized_shape, "layer_norm_bwd")
    if not _use_triton(n):
        dx, dw, db = _norm_bwd_reference(dy, x, n, weight, mean, rstd, rms=False)
    else:
        from .triton.norm import norm_bwd_launch

        dx, dw, db = norm_bwd_launch(dy, x, n, weight, mean, rstd, rms=False)
    dtype = _grad_dtype(weight, x)
    return dx, dw.to(dtype).reshape(normalized_shape), db.to(dtype).reshape(normalized_shape)


@layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, x, normalized_shape, weight, mean, rstd):
    dtype = _grad_dtype(weight, x)
    return torch.empty_like(x), x.new_empty(normalized_shape, dtype=dtype), x.new_empty(normalized_shape, dtype=dtype)


def _layer_norm_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.normalized_shape = normalized_shape
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.ds_ops.layer_norm_bwd(dy, x, ctx.normalized_shape, weight, mean, rstd)
    return dx, None, dw if weight is not None else None, db if ctx.has_bias else None, None


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)
register_kernel("layer_norm_fwd", "cuda", _layer_norm_fwd_cuda, kernel=_KERNEL, status=_triton.status)
register_kernel("layer_norm_bwd", "cuda", _layer_norm_bwd_cuda, kernel=_KERNEL, status=_triton.status)


# --- RMSNorm ------------------------------------------------------------------------------------


@custom_op("rms_norm_fwd")
def rms_norm_fwd(x: Tensor, normalized_shape: list[int], weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm forward: ``(y, rstd)``, the same ``y`` as ``torch.nn.functional.rms_norm``."""
    n = _rows(x, normalized_shape, "rms_norm_fwd")
    y, _, rstd = _norm_fwd_reference(x, n, weight, None, eps, rms=True)
    return y, rstd


def _rms_norm_fwd_cuda(x, normalized_shape, weight, eps):
    n = _rows(x, normalized_shape, "rms_norm_fwd")
    if not _use_triton(n):
        y, _, rstd = _norm_fwd_reference(x, n, weight, None, eps, rms=True)
        return y, rstd
    from .triton.norm import norm_fwd_launch

    y, _, rstd = norm_fwd_launch(x, n, weight, None, eps, rms=True)
    return y, rstd


@rms_norm_fwd.register_fake
def _rms_norm_fwd_fake(x, normalized_shape, weight, eps):
    return torch.empty_like(x), x.new_empty(x.numel() // math.prod(normalized_shape), dtype=torch.float32)


@custom_op("rms_norm_bwd")
def rms_norm_bwd(
    dy: Tensor, x: Tensor, normalized_shape: list[int], weight: Tensor | None, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """RMSNorm backward: ``(dx, dw)``; ``dw`` has ``normalized_shape``."""
    n = _rows(x, normalized_shape, "rms_norm_bwd")
    dx, dw, _ = _norm_bwd_reference(dy, x, n, weight, None, rstd, rms=True)
    return dx, dw.to(_grad_dtype(weight, x)).reshape(normalized_shape)


def _rms_norm_bwd_cuda(dy, x, normalized_shape, weight, rstd):
    n = _rows(x, normalized_shape, "rms_norm_bwd")
    if not _use_triton(n):
        dx, dw, _ = _norm_bwd_reference(dy, x, n, weight, None, rstd, rms=True)
    else:
        from .triton.norm import norm_bwd_launch

        dx, dw, _ = norm_bwd_launch(dy, x, n, weight, rstd, rstd, rms=True)
    return dx, dw.to(_grad_dtype(weight, x)).reshape(normalized_shape)


@rms_norm_bwd.register_fake
def _rms_norm_bwd_fake(dy, x, normalized_shape, weight, rstd):
    return torch.empty_like(x), x.new_empty(normalized_shape, dtype=_grad_dtype(weight, x))


def _rms_norm_setup(ctx, inputs, output):
    x, normalized_shape, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.normalized_shape = normalized_shape
    ctx.mark_non_differentiable(output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.ds_ops.rms_norm_bwd(dy, x, ctx.normalized_shape, weight, rstd)
    return dx, None, dw if weight is not None else None, None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
register_kernel("rms_norm_fwd", "cuda", _rms_norm_fwd_cuda, kernel=_KERNEL, status=_triton.status)
register_kernel("rms_norm_bwd", "cuda", _rms_norm_bwd_cuda, kernel=_KERNEL, status=_triton.status)


# --- functional and modules ---------------------------------------------------------------------


def _shape(normalized_shape: int | list[int] | tuple[int, ...] | torch.Size) -> list[int]:
    return [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:  # fmt: skip
    """Drop-in for ``torch.nn.functional.layer_norm`` through ``ds_ops::layer_norm_fwd``."""
    return torch.ops.ds_ops.layer_norm_fwd(x, _shape(normalized_shape), weight, bias, eps)[0]


def rms_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Drop-in for ``torch.nn.functional.rms_norm`` (with an explicit eps) through ``ds_ops::rms_norm_fwd``."""
    return torch.ops.ds_ops.rms_norm_fwd(x, _shape(normalized_shape), weight, eps)[0]


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` with the fused op; same arguments, parameters and state-dict keys."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        self.normalized_shape = tuple(_shape(normalized_shape))
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if elementwise_affine and bias else None

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` with the fused op (``y = x / sqrt(mean(x^2) + eps) * weight``)."""

    def __init__(self, normalized_shape, eps: float = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        self.normalized_shape = tuple(_shape(normalized_shape))
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
