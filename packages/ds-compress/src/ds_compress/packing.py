"""Packing integer codes into the ds-quant storage layout (docs/quantized-format.md) and back.

- 8 bits: one code per byte, int8 when symmetric, uint8 when asymmetric.
- 4, 2, 1 bits: uint8 ``[out, in * bits / 8]``; ``8 / bits`` consecutive input columns share a byte,
  the lowest column in the lowest bits. The stored field is ``q + 2^(b-1)`` for symmetric codes
  (offset binary) and ``q`` itself for asymmetric and 1-bit codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import CompressionError

__all__ = ["pack", "unpack", "packed_shape"]


def _offset(bits: int, symmetric: bool) -> int:
    return 2 ** (bits - 1) if symmetric and bits > 1 else 0


def packed_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    return (out_features, in_features) if bits == 8 else (out_features, in_features * bits // 8)


def pack(codes: Tensor, bits: int, symmetric: bool, where: str = "weight") -> Tensor:
    """Codes ``[out, in]`` (signed when symmetric) -> the stored ``qweight`` tensor."""
    if bits == 8:
        return codes.to(torch.int8 if symmetric else torch.uint8)
    if bits not in (4, 2, 1):
        raise CompressionError(f"{where}: {bits}-bit codes cannot be stored in the ds-quant format; "
                               f"it stores 8, 4, 2 and 1 bits: quantize to one of those")
    out, inp = codes.shape
    per = 8 // bits
    if inp % per:
        raise CompressionError(f"{where}: {bits}-bit packing needs the input dimension {inp} to be a "
                               f"multiple of {per} ({per} codes per byte); pad the layer or use 8 bits")
    field = (codes.to(torch.int32) + _offset(bits, symmetric)).reshape(out, inp // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (field << shifts).sum(-1).to(torch.uint8)


def unpack(qweight: Tensor, bits: int, symmetric: bool, in_features: int) -> Tensor:
    """The stored ``qweight`` -> codes ``[out, in]`` (int16, signed when symmetric)."""
    if bits == 8:
        return qweight.to(torch.int16)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=qweight.device) * bits
    field = (qweight.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    codes = field.reshape(qweight.shape[0], -1)[:, :in_features] - _offset(bits, symmetric)
    return codes.to(torch.int16)
