"""Block quantization for ZeRO++'s compressed collectives (Wang et al. 2023, "ZeRO++", sections 3.1, 3.3).

A tensor is cut into blocks of ``block`` consecutive values; each block keeps one fp32 scale (its
largest magnitude over the largest code) and one signed integer code per value: int8 codes in
[-127, 127], or int4 codes in [-7, 7] packed two to a byte (low nibble first). Symmetric rounding to
nearest, so a block's largest value is exact and the error of every value is at most half a step.

A *row* is what one rank sends for one destination: the codes (padded to whole blocks) followed by
the scales' bytes, as one ``uint8`` tensor, so a collective carries codes and scales in one message.
Plain torch ops only: ds-zero needs no kernel package (the op registry may offer a faster one).
"""

from __future__ import annotations

import torch

__all__ = ["WEIGHT_BLOCK", "GRAD_BLOCK", "GRAD_BITS", "row_bytes", "quantize_rows", "dequantize_rows"]

#: qwZ: int8 codes, one fp32 scale per 256 values (260 bytes per 1 KiB of fp32 weights).
WEIGHT_BLOCK = 256
#: qgZ: int4 codes, one fp32 scale per 128 values (68 bytes per 512 bytes of fp32 gradients).
GRAD_BLOCK, GRAD_BITS = 128, 4


def _blocks(numel: int, block: int) -> int:
    return max(1, -(-numel // block))


def row_bytes(numel: int, block: int, bits: int = 8) -> int:
    """Bytes of one quantized row of ``numel`` values: codes of whole blocks, then fp32 scales."""
    n = _blocks(numel, block)
    return n * block * bits // 8 + n * 4


def quantize_rows(x: torch.Tensor, block: int, bits: int = 8) -> torch.Tensor:
    """``x`` of shape ``[rows, numel]`` (any float dtype) -> ``uint8 [rows, row_bytes(numel)]``."""
    if bits not in (4, 8) or block % 2:
        raise ValueError(f"quantization with {bits} bits and block {block}: use 8 or 4 bits and an even block")
    rows, numel = x.shape
    n = _blocks(numel, block)
    blocks = torch.zeros(rows, n * block, dtype=torch.float32, device=x.device)
    blocks[:, :numel] = x
    blocks = blocks.view(rows, n, block)
    top = (1 << (bits - 1)) - 1
    scale = blocks.abs().amax(dim=2) / top
    # a block of zeros keeps scale 0 (it dequantizes to zeros); divide by 1 there instead
    codes = torch.round(blocks / torch.where(scale > 0, scale, 1.0).unsqueeze(2)).clamp_(-top, top)
    codes = codes.to(torch.int8).view(rows, n * block)
    if bits == 4:
        nib = (codes & 0xF).to(torch.uint8)  # two's complement nibbles
        codes = (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(torch.int8)
    return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8).view(rows, n * 4)], dim=1)


def dequantize_rows(q: torch.Tensor, numel: int, block: int, bits: int = 8,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`quantize_rows`: ``uint8 [rows, row_bytes]`` -> ``dtype [rows, numel]``."""
    rows = q.shape[0]
    n = _blocks(numel, block)
    code_bytes = n * block * bits // 8
    if q.shape[1] != code_bytes + n * 4:
        raise ValueError(f"a quantized row of {numel} values has {code_bytes + n * 4} bytes, got {q.shape[1]}")
    codes = q[:, :code_bytes]
    if bits == 4:
        low = (codes & 0xF).to(torch.int8)
        high = (codes >> 4).to(torch.int8)
        low = torch.where(low > 7, low - 16, low)
        high = torch.where(high > 7, high - 16, high)
        codes = torch.stack([low, high], dim=2).view(rows, n * block)
    else:
        codes = codes.view(torch.int8)
    scale = q[:, code_bytes:].contiguous().view(torch.float32).view(rows, n, 1)
    out = (codes.view(rows, n, block).to(torch.float32) * scale).view(rows, n * block)[:, :numel]
    return out.to(dtype)
