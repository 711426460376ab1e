"""The ds-quant code layout (docs/quantized-format.md): packing, unpacking, group-wise quantization.

A quantized linear ``[out, in]`` has integer codes ``q`` and one scale (and, asymmetric, one zero
point) per output row and group of ``group_size`` input columns:

- symmetric: ``w = q · s`` with ``q ∈ [-(2^(b-1) - 1), 2^(b-1) - 1]``;
- asymmetric: ``w = (q - z) · s`` with ``q ∈ [0, 2^b - 1]``;
- binary (``bits == 1``): ``w = (2q - 1) · s``.

8-bit codes are stored one per byte (int8 symmetric, uint8 asymmetric). 4-, 2- and 1-bit codes are
packed ``8 / bits`` to a byte along the input axis, lowest column in the lowest bits; the stored
field is unsigned (``q + 2^(b-1)`` for symmetric codes). This module is the reference: kernels
are tested against :func:`dequantize`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack", "unpack", "dequantize", "quantize_rtn", "qmax", "packed_cols"]


def qmax(bits: int) -> int:
    """Largest symmetric code magnitude: 127, 7, 1 (ternary) for 8, 4, 2 bits."""
    return 2 ** (bits - 1) - 1


def packed_cols(in_features: int, bits: int) -> int:
    return in_features if bits == 8 else in_features * bits // 8


def pack(q: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Integer codes ``[out, in]`` -> stored ``qweight`` (see the module docstring)."""
    if bits == 8:
        return q.to(torch.int8 if symmetric else torch.uint8)
    field = q.to(torch.int16) + (2 ** (bits - 1) if symmetric and bits > 1 else 0)
    per = 8 // bits
    out, cols = field.shape
    if cols % per:
        raise ValueError(f"in_features {cols} × {bits} bits is not a whole number of bytes")
    field = field.view(out, cols // per, per).to(torch.uint8)
    packed = torch.zeros(out, cols // per, dtype=torch.uint8, device=q.device)
    for j in range(per):
        packed |= field[:, :, j] << (j * bits)
    return packed


def unpack(qweight: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Stored ``qweight`` -> signed integer codes ``[out, in]`` (int16; binary codes are 0/1)."""
    if bits == 8:
        return qweight.to(torch.int16)
    per, mask = 8 // bits, (1 << bits) - 1
    fields = torch.stack([(qweight >> (j * bits)) & mask for j in range(per)], dim=-1)
    codes = fields.reshape(qweight.shape[0], -1).to(torch.int16)
    if symmetric and bits > 1:
        codes = codes - 2 ** (bits - 1)
    return codes


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
               symmetric: bool, dtype: torch.dtype | None = None) -> Tensor:
    """The dense weight ``[out, in]`` in ``dtype`` (default: the scales' dtype)."""
    q = unpack(qweight, bits, symmetric).float()
    out, cols = q.shape
    group = cols if group_size == -1 else group_size
    q = q.view(out, cols // group, group)
    if bits == 1:
        w = (2 * q - 1) * scales.float()[:, :, None]
    elif symmetric:
        w = q * scales.float()[:, :, None]
    else:
        w = (q - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(out, cols).to(dtype or scales.dtype)


def quantize_rtn(weight: Tensor, bits: int = 8, group_size: int = 128, symmetric: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest group-wise quantization: ``(qweight, scales, zeros)`` in the stored layout.

    Symmetric: ``s = max|w| / qmax`` per group. Asymmetric: ``s = (max - min) / (2^b - 1)`` and
    ``z = round(-min / s)`` so that 0 and the group's range are representable.
    """
    out, cols = weight.shape
    group = cols if group_size == -1 else group_size
    if cols % group:
        raise ValueError(f"group_size {group_size} does not divide in_features {cols}")
    w = weight.detach().float().reshape(out, cols // group, group)
    if symmetric:
        m = qmax(bits)
        scales = w.abs().amax(dim=-1) / m
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(w / scales[..., None]).clamp_(-m, m)
        zeros = None
    else:
        top = 2**bits - 1
        lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scales = (hi - lo) / top
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zeros = torch.round(-lo / scales).clamp_(0, top)
        q = torch.round(w / scales[..., None] + zeros[..., None]).clamp_(0, top)
    q = q.reshape(out, cols).to(torch.int16)
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return pack(q, bits, symmetric), scales.to(dtype), None if zeros is None else zeros.to(dtype)
