"""``ds_ops::decode_linear``: ``F.linear`` for the few rows of activations a decode step has.

``decode_linear(x [..., K], weight [N, K], bias [N] | None)`` returns ``x · weightᵀ + bias``, exactly
``F.linear``'s contract, with the weight in PyTorch's own layout.

Kernels:
- default (any device): ``F.linear``;
- "cpu": for fp32 with at most :data:`CPU_ROWS` rows (decoding), a C++ kernel (csrc/gemv.cpp) that
  reads each weight row once, in place, and multiplies it into every row of ``x`` while it is in L1
  (a BLAS GEMM packs the weight on every call first); anything else runs ``at::linear``. The result
  matches ``F.linear`` within fp32 rounding (the sums run in another order).

The CPU kernel registers itself with the dispatcher when its library loads (see
:func:`~ds_ops.registry.define_op`), so calls reach C++ without a Python layer. The library is built
and loaded by the first CPU call, which until then runs the default; when it cannot be built (no
compiler, ``DS_OPS_JIT=0``) the default keeps running, after one warning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import build
from .registry import OpInputError, define_op, record_kernel

__all__ = ["decode_linear", "CPU_ROWS"]

CPU_ROWS = 16  # csrc/gemv.cpp: kMaxRows


def _check(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise OpInputError(f"decode_linear: x {list(x.shape)} and weight {list(weight.shape)} do not fit; "
                           "x must be [..., in_features] with weight [out_features, in_features]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise OpInputError(f"decode_linear: bias {list(bias.shape)} must be [{weight.shape[0]}] (out_features)")


def _default(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check(x, weight, bias)
    if x.device.type == "cpu" and "gemv" not in build._loaded and build.load_or_none("gemv") is not None:
        return decode_linear(x, weight, bias)  # the C++ CPU kernel is registered now
    return F.linear(x, weight, bias)


decode_linear = define_op("decode_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor", _default)


@torch.library.register_fake("ds_ops::decode_linear")
def _decode_linear_fake(x, weight, bias):
    _check(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


record_kernel("decode_linear", "cpu", kernel="c++ jit (csrc/gemv.cpp), dispatcher-registered",
              status=lambda: build.describe("gemv"))
