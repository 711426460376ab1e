"""``ds_ops::quantize_blockwise`` / ``ds_ops::dequantize_blockwise``: absmax int8 and int4 blocks.

The flattened tensor is cut into blocks of ``block_size`` elements; each block stores one fp32
``absmax`` and one code per element, ``q = floor(x * qmax / absmax + 1/2)`` clamped to
``[-qmax, qmax]`` with qmax = 127 (int8, one ``int8`` per element) or 7 (int4, two codes per
``uint8``: ``code + 8`` in the low nibble for even elements, the high nibble for odd ones).
Dequantization is ``q * absmax / qmax``.

Round-trip error bound: every element of a block is within half a quantization step of its
input, ``|x - dequantize(quantize(x))| <= absmax / qmax / 2`` (absmax/254 for int8, absmax/14 for
int4), up to float32 rounding of the scale (a relative 1e-6 of absmax); all-zero blocks are exact.
Rounding of the dequantized value to bf16/fp16 comes on top when that output dtype is asked for.

ds-compress (weight quantization) and ds-infer (quantized weights, KV cache) use these ops through
the op registry. The default is plain PyTorch; the "cuda" kernel is :mod:`ds_ops.triton.quant`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton as _triton
from .registry import custom_op, register_kernel

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_blockwise_reference",
    "dequantize_blockwise_reference",
    "QuantizedBlocks",
    "quantize",
    "error_bound",
    "QMAX",
    "BLOCK_SIZES",
]

QMAX = {8: 127, 4: 7}
BLOCK_SIZES = tuple(2**k for k in range(4, 13))  # 16 .. 4096: powers of two, as Triton blocks need
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(block_size: int, bits: int, dtype: torch.dtype, what: str) -> None:
    if bits not in QMAX:
        raise ValueError(f"{what}: bits={bits} is not supported; use 8 (int8) or 4 (int4, two per byte)")
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"{what}: block_size={block_size} must be a power of two in [16, 4096]; 64, 128 and 256 are usual"
        )
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: dtype {dtype} is not supported; use float32, bfloat16 or float16")


def _scale(absmax: Tensor, qmax: int) -> Tensor:
    return torch.where(absmax > 0, qmax / absmax.clamp_min(1e-38), torch.zeros_like(absmax))


def quantize_blockwise_reference(x: Tensor, block_size: int = 64, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch quantization (the op's default and the kernel's reference)."""
    _check(block_size, bits, x.dtype, "quantize_blockwise")
    qmax = QMAX[bits]
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = F.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1) if blocks else flat.new_empty(0)
    q = torch.floor(padded * _scale(absmax, qmax)[:, None] + 0.5).clamp_(-qmax, qmax).reshape(-1)[:n]
    if bits == 8:
        return q.to(torch.int8), absmax
    nibbles = F.pad(q + 8, (0, n % 2), value=8.0).to(torch.uint8).view(-1, 2)
    return nibbles[:, 0] | (nibbles[:, 1] << 4), absmax


def dequantize_blockwise_reference(
    q: Tensor,
    absmax: Tensor,
    shape: list[int],
    block_size: int = 64,
    bits: int = 8,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pure-PyTorch dequantization (the op's default and the kernel's reference)."""
    _check(block_size, bits, dtype, "dequantize_blockwise")
    n = math.prod(shape)
    if bits == 8:
        codes = q.reshape(-1)[:n].float()
    else:
        packed = q.reshape(-1).to(torch.int32)
        codes = (torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n] - 8).float()
    blocks = -(-n // block_size)
    padded = F.pad(codes, (0, blocks * block_size - n)).view(blocks, block_size)
    out = padded * (absmax.float() / QMAX[bits])[:, None]
    return out.reshape(-1)[:n].reshape(shape).to(dtype)


@custom_op("quantize_blockwise")
def quantize_blockwise(x: Tensor, block_size: int = 64, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` blockwise to ``(codes, absmax)``.

    ``codes`` is flat: int8 of ``x.numel()`` elements (bits=8) or uint8 of ``ceil(numel / 2)``
    packed pairs (bits=4); ``absmax`` is float32 with one entry per block.
    """
    return quantize_blockwise_reference(x, block_size, bits)


@custom_op("dequantize_blockwise")
def dequantize_blockwise(
    q: Tensor,
    absmax: Tensor,
    shape: list[int],
    block_size: int = 64,
    bits: int = 8,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Rebuild a ``shape``-shaped tensor of ``dtype`` from :func:`quantize_blockwise`'s output."""
    return dequantize_blockwise_reference(q, absmax, shape, block_size, bits, dtype)


def _quantize_blockwise_cuda(x, block_size=64, bits=8):
    _check(block_size, bits, x.dtype, "quantize_blockwise")
    if not _triton.available():
        return quantize_blockwise_reference(x, block_size, bits)
    from .triton.quant import quantize_blockwise_launch

    return quantize_blockwise_launch(x, block_size, bits)


def _dequantize_blockwise_cuda(q, absmax, shape, block_size=64, bits=8, dtype=torch.float32):
    _check(block_size, bits, dtype, "dequantize_blockwise")
    if not _triton.available():
        return dequantize_blockwise_reference(q, absmax, shape, block_size, bits, dtype)
    from .triton.quant import dequantize_blockwise_launch

    return dequantize_blockwise_launch(q, absmax, list(shape), block_size, bits, dtype)


for _name, _fn in (("quantize_blockwise", _quantize_blockwise_cuda), ("dequantize_blockwise", _dequantize_blockwise_cuda)):
    register_kernel(_name, "cuda", _fn, kernel="triton (ds_ops.triton.quant)", status=_triton.status)


@quantize_blockwise.register_fake
def _quantize_blockwise_fake(x, block_size=64, bits=8):
    n = x.numel()
    codes = x.new_empty(n if bits == 8 else (n + 1) // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
    return codes, x.new_empty((n + block_size - 1) // block_size, dtype=torch.float32)


@dequantize_blockwise.register_fake
def _dequantize_blockwise_fake(q, absmax, shape, block_size=64, bits=8, dtype=torch.float32):
    return q.new_empty(shape, dtype=dtype)


def error_bound(absmax: Tensor, bits: int = 8) -> Tensor:
    """Largest round-trip error per block: half a quantization step, ``absmax / qmax / 2``."""
    return absmax.float() / (2 * QMAX[bits])


@dataclass(frozen=True)
class QuantizedBlocks:
    """A blockwise-quantized tensor: codes, per-block absmax and what is needed to rebuild it."""

    codes: Tensor
    absmax: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int
    bits: int

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return torch.ops.ds_ops.dequantize_blockwise(
            self.codes, self.absmax, list(self.shape), self.block_size, self.bits, dtype or self.dtype
        )

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * 4


def quantize(x: Tensor, block_size: int = 64, bits: int = 8) -> QuantizedBlocks:
    """Quantize through the registered op (Triton on CUDA when available) and keep the metadata."""
    codes, absmax = torch.ops.ds_ops.quantize_blockwise(x, block_size, bits)
    return QuantizedBlocks(codes, absmax, tuple(x.shape), x.dtype, block_size, bits)
