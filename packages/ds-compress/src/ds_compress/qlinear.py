"""Linear layers that hold quantized weights.

:class:`QuantizedLinear` is what post-training quantization produces: integer codes, scales and zero
points in exactly the ds-quant layout (docs/quantized-format.md), an optional GPTQ act-order
permutation, and an optional activation quantizer (ZeroQuant W8A8). Its forward runs the model as
ds-infer will: ``x[..., perm]``, per-token int8 activations, ``x @ decode(codes).T + bias``.

:class:`FakeQuantLinear` is the trainable form used while distilling (ZeroQuant's layer-by-layer
distillation, XTC): an fp master weight, fake-quantized in every forward with a straight-through
gradient by the same quantizer, converted to a :class:`QuantizedLinear` when training ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizer import (
    QuantizedWeight,
    QuantSpec,
    decode,
    fake_quantize,
    fake_quantize_activation,
    quantize_weight,
)

__all__ = ["QuantizedLinear", "FakeQuantLinear", "ActivationSpec"]

ActivationSpec = dict  # {"bits": 8, "dynamic": True, "granularity": "token", "symmetric": True}


def _quantize_input(x: Tensor, act: ActivationSpec | None, act_scale: Tensor | None) -> Tensor:
    if act is None:
        return x
    if act.get("dynamic", True):
        return fake_quantize_activation(x, act["bits"], act.get("symmetric", True))
    top = 2 ** (act["bits"] - 1) - 1  # static: one stored symmetric scale per layer
    s = act_scale.float() if float(act_scale) > 0 else torch.ones_like(act_scale, dtype=torch.float32)
    return (torch.round(x.float() / s).clamp(-top, top) * s).to(x.dtype)


class QuantizedLinear(nn.Module):
    """A linear layer stored as codes + scales (+ zeros, + perm); computes with the decoded weight."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 dtype: torch.dtype = torch.float32, perm: bool = False,
                 activations: ActivationSpec | None = None, method: str = "rtn") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.activations, self.method = spec, activations, method
        self.dtype = dtype
        groups = spec.groups(in_features)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int16))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("zeros", None if spec.symmetric else torch.zeros(out_features, groups, dtype=dtype))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32) if perm else None)
        static = activations is not None and not activations.get("dynamic", True)
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32) if static else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._weight_cache: Tensor | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None, perm: Tensor | None = None,
                       activations: ActivationSpec | None = None, method: str = "rtn",
                       act_scale: Tensor | None = None) -> QuantizedLinear:
        out, inp = qw.codes.shape
        layer = cls(inp, out, qw.spec, bias is not None, qw.scales.dtype, perm is not None, activations, method)
        layer.codes.copy_(qw.codes)
        layer.scales.copy_(qw.scales)
        if qw.zeros is not None:
            layer.zeros.copy_(qw.zeros)
        if perm is not None:
            layer.perm.copy_(perm.to(torch.int32))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(qw.scales.dtype))
        if act_scale is not None:
            layer.act_scale.fill_(float(act_scale))
        return layer.to(qw.codes.device)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.spec)

    def dequantized_weight(self) -> Tensor:
        """The weight the layer computes with, over the (permuted, when ``perm``) input columns."""
        if self._weight_cache is None or self._weight_cache.device != self.codes.device:
            self._weight_cache = decode(self.codes, self.scales, self.zeros, self.spec, self.dtype)
        return self._weight_cache

    def _apply(self, fn, recurse=True):
        self._weight_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight_cache = None  # new codes or scales: decode again
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if self.perm is not None:
            x = x[..., self.perm.long()]
        x = _quantize_input(x, self.activations, self.act_scale)
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        act = f", activations={self.activations['bits']}-bit" if self.activations else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, symmetric={self.spec.symmetric}, "
                f"perm={self.perm is not None}, method={self.method}{act}")


class FakeQuantLinear(nn.Linear):
    """A trainable linear whose forward sees fake-quantized weights (and activations)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, activations: ActivationSpec | None = None) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight = nn.Parameter(linear.weight.detach().clone())
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())
        self.spec, self.activations = spec, activations

    def forward(self, x: Tensor) -> Tensor:
        x = _quantize_input(x, self.activations, None)
        return F.linear(x, fake_quantize(self.weight, self.spec), self.bias)

    def to_quantized(self, method: str) -> QuantizedLinear:
        qw = quantize_weight(self.weight.detach(), self.spec)
        return QuantizedLinear.from_quantized(qw, self.bias, activations=self.activations, method=method)
