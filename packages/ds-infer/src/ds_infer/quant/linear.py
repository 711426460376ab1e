"""``QuantLinear``: a linear layer over ds-quant codes, dequantized inside the GEMM.

Weights stay packed (int8, or 4/2/1-bit codes ``8 / bits`` to a byte) with group-wise scales; the
product runs through the op registry's ``ds_ops::woq_linear`` (a C++ kernel on CPU, Triton on CUDA,
both reading the packed codes directly) and falls back to dequantize-then-``F.linear`` when ds-ops
is not installed. Optional parts of the format are honoured: asymmetric zero points, the GPTQ
act-order permutation of the input columns, and ZeroQuant's W8A8 activation quantization
(dynamic per-token or a stored static scale).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_core.ops import get_op

from .pack import dequantize, packed_cols, quantize_rtn

if TYPE_CHECKING:
    from ..models.loader import QuantizedParts

__all__ = ["QuantLinear", "woq_linear_reference", "quantize_activations"]


def woq_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                         group_size: int, symmetric: bool) -> Tensor:
    """``x @ dequantize(W).T`` in ``x``'s dtype: the definition every kernel is tested against."""
    w = dequantize(qweight, scales, zeros, bits, group_size, symmetric, dtype=x.dtype)
    return F.linear(x, w)


def quantize_activations(x: Tensor, static_scale: Tensor | None = None) -> Tensor:
    """Symmetric int8 activations (ZeroQuant): per token and dynamic, or one stored step size."""
    if static_scale is not None:
        step = static_scale.to(torch.float32)
    else:
        step = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    return (torch.round(x.float() / step).clamp_(-127, 127) * step).to(x.dtype)


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` held as ds-quant codes (see docs/quantized-format.md)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 qweight: Tensor, scales: Tensor, zeros: Tensor | None = None, bias: Tensor | None = None,
                 perm: Tensor | None = None, act_dynamic: bool = False, act_scale: Tensor | None = None) -> None:
        super().__init__()
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits {bits} is not supported; ds-quant stores 1, 2, 4 or 8-bit codes")
        if tuple(qweight.shape) != (out_features, packed_cols(in_features, bits)):
            raise ValueError(f"qweight shape {tuple(qweight.shape)} != ({out_features}, "
                             f"{packed_cols(in_features, bits)}) for {bits}-bit codes of {out_features}x{in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = in_features if group_size == -1 else group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("perm", None if perm is None else perm.long())
        self.register_buffer("act_scale", act_scale)
        self.act_dynamic = act_dynamic
        self._op = get_op("woq_linear", woq_linear_reference)

    @classmethod
    def from_parts(cls, q: QuantizedParts) -> QuantLinear:
        s = q.scheme
        act = q.activations or None
        return cls(int(s["in_features"]), int(s["out_features"]), int(s["bits"]), int(s["group_size"]),
                   bool(s.get("symmetric", True)), q.qweight, q.scales, q.zeros, q.bias, q.perm,
                   act_dynamic=bool(act and act.get("dynamic", True)), act_scale=q.act_scale)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None, bits: int = 8, group_size: int = 128,
                   symmetric: bool = True) -> QuantLinear:
        """Round-to-nearest quantization of a dense weight (weight-only, no calibration)."""
        out, cols = weight.shape
        group = cols if group_size == -1 or group_size >= cols else group_size
        qweight, scales, zeros = quantize_rtn(weight, bits, group, symmetric)
        return cls(cols, out, bits, group, symmetric, qweight, scales, zeros,
                   None if bias is None else bias.detach())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.symmetric,
                          dtype or self.scales.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.act_dynamic or self.act_scale is not None:
            x = quantize_activations(x, self.act_scale)
        shape = x.shape
        y = self._op(x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.bits,
                     self.group_size, self.symmetric)
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        extra = ", act-order" if self.perm is not None else ""
        extra += ", W8A8" if self.act_dynamic or self.act_scale is not None else ""
        return (f"in={self.in_features}, out={self.out_features}, int{self.bits} {kind}, "
                f"group={self.group_size}{extra}")
