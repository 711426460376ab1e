"""The one group-wise weight quantizer under every ds-compress method.

RTN, GPTQ, ZeroQuant, XTC and the fake-quantization of quantization-aware training all call the same
three functions: :func:`compute_qparams` (one scale, and a zero point when asymmetric, per output row
and input group), :func:`encode` (weights -> integer codes, nearest or stochastic rounding) and
:func:`decode` (codes -> weights). The codes and their meaning are exactly those of the ds-quant
checkpoint format (docs/quantized-format.md), so what training simulates is what ds-infer runs.

Scale rules per bit width:

- symmetric, ``bits >= 3``: ``scale = absmax / (2^(b-1) - 1)``, codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``;
- symmetric, ``bits == 2``: ternary codes ``{-1, 0, 1}`` with the scale of Ternary Weight Networks
  (Li et al. 2016): the mean magnitude of the weights above ``0.7 * mean|w|`` (the scale XTC and
  TernaryBERT use); codes by nearest rounding on that scale;
- ``bits == 1``: binary codes ``{0, 1}`` meaning ``-scale`` and ``+scale``, ``scale = mean|w|``
  (XNOR-Net, Rastegari et al. 2016); symmetric only;
- asymmetric: ``scale = (max - min) / (2^b - 1)`` over a range stretched to contain 0, and an integer
  zero point ``round(-min / scale)``, codes in ``[0, 2^b - 1]``.

Activations (ZeroQuant's token-wise dynamic quantization, and QAT's static ranges) use the same
symmetric/asymmetric rules through :func:`fake_quantize_activation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CompressionError

__all__ = [
    "STORABLE_BITS",
    "QuantSpec",
    "QuantizedWeight",
    "check_spec",
    "compute_qparams",
    "encode",
    "decode",
    "quantize_weight",
    "fake_quantize",
    "fake_quantize_activation",
    "code_range",
]

STORABLE_BITS = (8, 4, 2, 1)  # the widths the ds-quant format stores


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: bit width, input-group size (-1: one group per row), symmetry."""

    bits: int
    group_size: int = -1
    symmetric: bool = True

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


@dataclass
class QuantizedWeight:
    """Integer codes ``[out, in]`` (int16, unpacked) with their ``scales`` and ``zeros`` ``[out, groups]``."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return decode(self.codes, self.scales, self.zeros, self.spec, dtype or self.scales.dtype)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The smallest and largest integer code of a width (the stored meaning, before offsetting)."""
    if bits == 1:
        return 0, 1
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def check_spec(spec: QuantSpec, in_features: int | None = None, where: str = "weight",
               allowed_bits: tuple[int, ...] = tuple(range(1, 9))) -> None:
    """Raise :class:`CompressionError` naming the value, the rule and the fix."""
    if isinstance(spec.bits, bool) or not isinstance(spec.bits, int) or spec.bits not in allowed_bits:
        raise CompressionError(
            f"{where}: bits={spec.bits!r} is not supported; bits must be one of "
            f"{', '.join(map(str, allowed_bits))}")
    if spec.bits == 1 and not spec.symmetric:
        raise CompressionError(
            f"{where}: bits=1 (binary) is symmetric by definition (codes mean -scale and +scale); "
            f"set symmetric=True / quantization_type 'symmetric'")
    gs = spec.group_size
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs <= 0):
        raise CompressionError(
            f"{where}: group_size={gs!r} must be a positive divisor of the input dimension, or -1 for "
            f"one group per output row")
    if in_features is not None and gs != -1 and in_features % gs != 0:
        divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
        hint = f" (e.g. {divisors[-1]})" if divisors else ""
        raise CompressionError(
            f"{where}: group_size={gs} does not divide the input dimension {in_features}; choose a "
            f"divisor of {in_features}{hint} or group_size=-1")


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """``[out, in]`` -> ``[out, groups, group_size]`` (a view)."""
    out, inp = w.shape
    gs = inp if group_size == -1 else group_size
    return w.reshape(out, inp // gs, gs)


def _expand(t: Tensor, in_features: int) -> Tensor:
    """Per-group ``[out, groups]`` -> per-element ``[out, in]``."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def _group_stats(g: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Scales (and zero points) over the last dimension of ``g`` (float32)."""
    g = g.float()
    if spec.bits == 1:
        scale = g.abs().mean(-1)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    if spec.symmetric and spec.bits == 2:
        mag = g.abs()
        threshold = 0.7 * mag.mean(-1, keepdim=True)
        above = mag > threshold
        count = above.sum(-1)
        scale = (mag * above).sum(-1) / count.clamp(min=1)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo, hi = code_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        scale = g.abs().amax(-1) / hi
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    gmin = g.amin(-1).clamp(max=0)
    gmax = g.amax(-1).clamp(min=0)
    scale = (gmax - gmin) / hi
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-gmin / scale).clamp(lo, hi)
    return scale, zero


def compute_qparams(w: Tensor, spec: QuantSpec, row_block: int = 1) -> tuple[Tensor, Tensor | None]:
    """Scales and zero points ``[out, groups]`` (float32) of a 2-D weight.

    ``row_block > 1`` shares one scale over blocks of that many consecutive rows (DeepSpeed's
    ``quantize_groups`` smaller than the number of rows); the result is still per row, with equal
    values inside a block, so it stores in the same layout.
    """
    out = w.shape[0]
    g = _grouped(w.detach(), spec.group_size)  # [out, G, gs]
    if row_block > 1:
        blocks = g.reshape(out // row_block, row_block, g.shape[1], g.shape[2]).transpose(1, 2)
        scale, zero = _group_stats(blocks.reshape(out // row_block, g.shape[1], -1), spec)
        scale = scale.repeat_interleave(row_block, dim=0)
        zero = zero.repeat_interleave(row_block, dim=0) if zero is not None else None
        return scale, zero
    return _group_stats(g, spec)


def encode(w: Tensor, scales: Tensor, zeros: Tensor | None, spec: QuantSpec, stochastic: bool = False,
           generator: torch.Generator | None = None) -> Tensor:
    """Integer codes (int16) of ``w`` ``[out, in]`` for per-group ``scales``/``zeros`` ``[out, groups]``."""
    w = w.detach().float()
    s = _expand(scales.float(), w.shape[1])
    if spec.bits == 1:
        return (w >= 0).to(torch.int16)
    x = w / s
    if stochastic:
        noise = torch.rand(x.shape, generator=generator, device=x.device) - 0.5
        x = x + noise
    lo, hi = code_range(spec.bits, spec.symmetric)
    if not spec.symmetric:
        x = x + _expand(zeros.float(), w.shape[1])
    return torch.round(x).clamp_(lo, hi).to(torch.int16)


def decode(codes: Tensor, scales: Tensor, zeros: Tensor | None, spec: QuantSpec,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Weights from codes: ``q*s`` (symmetric), ``(q - z)*s`` (asymmetric), ``(2q - 1)*s`` (binary)."""
    s = _expand(scales.float(), codes.shape[1])
    q = codes.float()
    if spec.bits == 1:
        q = 2 * q - 1
    elif not spec.symmetric:
        q = q - _expand(zeros.float(), codes.shape[1])
    return (q * s).to(dtype)


def quantize_weight(w: Tensor, spec: QuantSpec, stochastic: bool = False, row_block: int = 1,
                    generator: torch.Generator | None = None) -> QuantizedWeight:
    """Codes, scales and zeros of ``w``. Scales are rounded to ``w``'s dtype first (that is how they are
    stored), and the codes are computed against the rounded scales, so decoding is exact."""
    scales, zeros = compute_qparams(w, spec, row_block)
    scales = scales.to(w.dtype)
    zeros = zeros.to(w.dtype) if zeros is not None else None
    codes = encode(w, scales, zeros, spec, stochastic=stochastic, generator=generator)
    return QuantizedWeight(codes, scales, zeros, spec)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value; backward: the gradient unchanged (Bengio et al. 2013's STE)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def fake_quantize(w: Tensor, spec: QuantSpec, stochastic: bool = False, row_block: int = 1) -> Tensor:
    """``decode(encode(w))`` in ``w``'s dtype, with a straight-through gradient (QAT's fake quant)."""
    scales, zeros = compute_qparams(w, spec, row_block)
    deq = decode(encode(w, scales, zeros, spec, stochastic=stochastic), scales, zeros, spec, w.dtype)
    return _StraightThrough.apply(w, deq) if w.requires_grad else deq


def fake_quantize_activation(x: Tensor, bits: int = 8, symmetric: bool = True,
                             value_range: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Quantize-dequantize an activation with a straight-through gradient.

    ``value_range=None``: dynamic, one scale per token (every vector along the last dimension,
    ZeroQuant's token-wise quantization). ``value_range=(min, max)``: static, one range for the tensor.
    """
    lo, hi = code_range(bits, symmetric)
    xf = x.detach().float()
    if value_range is None:
        if symmetric:
            scale = xf.abs().amax(-1, keepdim=True) / hi
        else:
            mn = xf.amin(-1, keepdim=True).clamp(max=0)
            mx = xf.amax(-1, keepdim=True).clamp(min=0)
            scale = (mx - mn) / hi
    else:
        mn, mx = (v.float() for v in value_range)
        scale = torch.maximum(mn.abs(), mx.abs()) / hi if symmetric else (mx.clamp(min=0) - mn.clamp(max=0)) / hi
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if symmetric:
        q = torch.round(xf / scale).clamp(lo, hi) * scale
    else:
        mn_used = (xf.amin(-1, keepdim=True).clamp(max=0) if value_range is None else value_range[0].float().clamp(max=0))
        zero = torch.round(-mn_used / scale)
        q = (torch.round(xf / scale + zero).clamp(lo, hi) - zero) * scale
    q = q.to(x.dtype)
    return _StraightThrough.apply(x, q) if x.requires_grad else q
