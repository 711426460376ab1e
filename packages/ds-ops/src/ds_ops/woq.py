"""``ds_ops::woq_linear``: weight-only quantized linear over packed ds-quant codes, no bias.

``woq_linear(x [M, K], qweight, scales [N, G], zeros [N, G] | None, bits, group_size, symmetric)``
returns ``x · Wᵀ`` (``[M, N]``, ``x.dtype``) where ``W [N, K]`` is described by the codes as in
docs/quantized-format.md: ``bits`` 8 (int8 symmetric / uint8 asymmetric, one per byte) or 4, 2, 1
(``8 / bits`` columns per byte, lowest column in the lowest bits, offset binary when symmetric),
``w = q·s`` (symmetric), ``(q − z)·s`` (asymmetric), ``(2q − 1)·s`` (binary), one scale per row and
group of ``group_size`` input columns (``-1``: one group).

Kernels:
- default (any device): dequantize, then ``F.linear`` — the reference;
- "cpu": for up to :data:`CPU_GEMV_ROWS` rows of ``x`` (decoding), a C++ kernel (csrc/woq.cpp) that
  reads the packed bytes directly (int8 moves 1/4, int4 1/8 of fp32's weight bytes); more rows
  (prefill, compute-bound) take the default;
- "cuda": the Triton kernel of :mod:`ds_ops.triton.woq` (dequantization in registers inside the GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import build
from . import triton as _triton
from .registry import OpInputError, custom_op, register_kernel

__all__ = ["woq_linear", "woq_linear_reference", "dequantize_codes", "CPU_GEMV_ROWS"]

CPU_GEMV_ROWS = 16


def _check(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
           symmetric: bool) -> tuple[int, int, int]:
    if bits not in (1, 2, 4, 8):
        raise OpInputError(f"woq_linear: bits={bits}; the ds-quant codes are 8, 4, 2 or 1 bits")
    if x.dim() != 2:
        raise OpInputError(f"woq_linear: x must be [rows, in_features]; got shape {tuple(x.shape)}")
    k = x.shape[1]
    n = qweight.shape[0]
    if qweight.shape[1] * (8 // bits if bits < 8 else 1) != k:
        raise OpInputError(f"woq_linear: qweight {tuple(qweight.shape)} holds {qweight.shape[1]} bytes per row, "
                           f"which is not {k} columns of {bits}-bit codes")
    group = k if group_size == -1 else group_size
    if group <= 0 or k % group:
        raise OpInputError(f"woq_linear: group_size {group_size} does not divide in_features {k}")
    if tuple(scales.shape) != (n, k // group):
        raise OpInputError(f"woq_linear: scales {tuple(scales.shape)} != ({n}, {k // group}) for group_size {group}")
    if not symmetric and bits > 1 and (zeros is None or zeros.shape != scales.shape):
        raise OpInputError("woq_linear: asymmetric codes need zeros shaped like scales")
    return n, k, group


def dequantize_codes(qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
                     symmetric: bool, dtype: torch.dtype) -> Tensor:
    """The dense ``[N, K]`` weight the codes describe (the format's definition)."""
    n = qweight.shape[0]
    if bits == 8:
        q = qweight.to(torch.int16)
    else:
        per, mask = 8 // bits, (1 << bits) - 1
        q = torch.stack([(qweight >> (j * bits)) & mask for j in range(per)], dim=-1).reshape(n, -1).to(torch.int16)
        if symmetric and bits > 1:
            q = q - 2 ** (bits - 1)
    k = q.shape[1]
    group = k if group_size == -1 else group_size
    qf = q.float().view(n, k // group, group)
    s = scales.float()[:, :, None]
    if bits == 1:
        w = (2 * qf - 1) * s
    elif symmetric:
        w = qf * s
    else:
        w = (qf - zeros.float()[:, :, None]) * s
    return w.reshape(n, k).to(dtype)


def woq_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                         group_size: int, symmetric: bool) -> Tensor:
    _check(x, qweight, scales, zeros, bits, group_size, symmetric)
    return F.linear(x, dequantize_codes(qweight, scales, zeros, bits, group_size, symmetric, x.dtype))


@custom_op("woq_linear")
def woq_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
               symmetric: bool) -> Tensor:
    """See the module docstring."""
    return woq_linear_reference(x, qweight, scales, zeros, bits, group_size, symmetric)


@woq_linear.register_fake
def _woq_linear_fake(x, qweight, scales, zeros, bits, group_size, symmetric):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _offsets(bits: int, symmetric: bool) -> tuple[float, float]:
    if bits == 1:
        return 1.0, 2.0
    if bits == 8 or not symmetric:
        return 0.0, 1.0
    return float(2 ** (bits - 1)), 1.0


def _woq_linear_cpu(x, qweight, scales, zeros, bits, group_size, symmetric):
    n, k, group = _check(x, qweight, scales, zeros, bits, group_size, symmetric)
    m = x.shape[0]
    ext = build.load_or_none("woq") if 0 < m <= CPU_GEMV_ROWS else None
    if ext is None:
        return woq_linear_reference(x, qweight, scales, zeros, bits, group_size, symmetric)
    p = 8 // bits if bits < 8 else 1
    xf = x.float()
    # planes: plane j holds columns j, j+P, j+2P, ... so each field of a byte meets its column
    planes = xf.view(m, k // p, p).transpose(1, 2).contiguous() if p > 1 else xf.contiguous()
    xsum = xf.view(m, k // group, group).sum(-1).contiguous()
    s = scales.float().contiguous()
    off, a = _offsets(bits, symmetric)
    z = zeros.float().contiguous() if zeros is not None and not symmetric and bits > 1 else None
    q = qweight.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    ext.woq_gemv(planes.data_ptr(), xsum.data_ptr(), q.data_ptr(), s.data_ptr(), z.data_ptr() if z is not None else 0,
                 off, a, m, k, n, k // group, group, bits, bits == 8 and symmetric, y.data_ptr())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _woq_linear_cuda(x, qweight, scales, zeros, bits, group_size, symmetric):
    _check(x, qweight, scales, zeros, bits, group_size, symmetric)
    if not _triton.available():
        return woq_linear_reference(x, qweight, scales, zeros, bits, group_size, symmetric)
    from .triton.woq import woq_linear_launch

    return woq_linear_launch(x, qweight, scales, zeros, bits, group_size, symmetric)


register_kernel("woq_linear", "cpu", _woq_linear_cpu, kernel="c++ jit (csrc/woq.cpp)",
                status=lambda: build.describe("woq"))
register_kernel("woq_linear", "cuda", _woq_linear_cuda, kernel="triton (ds_ops.triton.woq)", status=_triton.status)
