"""Blockwise absmax int8/int4 quantize and dequantize in Triton: one program per block.

Each block of ``BLOCK`` consecutive elements (of the flattened tensor) is scaled by
``qmax / absmax(block)`` and rounded half up to an integer in ``[-qmax, qmax]`` (qmax 127 for int8,
7 for int4), as in Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (linear code
instead of their dynamic map). int4 codes are stored offset by 8 (nibbles 1..15), two per byte:
element ``2k`` in the low nibble, ``2k+1`` in the high one, so a block owns ``BLOCK/2`` whole bytes.
The arithmetic (IEEE division, ``floor(y + 0.5)``) is the same as the default in
:mod:`ds_ops.quant`, so kernel and default give the same codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize_blockwise_launch", "dequantize_blockwise_launch"]

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _scale_of(absmax, QMAX: tl.constexpr):
    # 1e-38 is below float32's smallest normal number, so a bare literal would be typed float64 (which
    # tl.div_rn refuses when compiling for a GPU; the interpreter accepts it): make it float32.
    tiny = tl.full((), 1e-38, tl.float32)
    return tl.where(absmax > 0.0, tl.div_rn(tl.full((), QMAX, tl.float32), tl.maximum(absmax, tiny)), 0.0)


@triton.jit
def _round_clamp(y, QMAX: tl.constexpr):
    return tl.minimum(tl.maximum(tl.floor(y + 0.5), -QMAX), QMAX)


@triton.jit
def _quantize_int8_kernel(x_ptr, q_ptr, absmax_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=0)
    q = _round_clamp(x * _scale_of(absmax, 127.0), 127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(absmax_ptr + pid, absmax)


@triton.jit
def _quantize_int4_kernel(x_ptr, q_ptr, absmax_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    half = tl.arange(0, BLOCK // 2)
    even = pid.to(tl.int64) * BLOCK + 2 * half
    x_lo = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    x_hi = tl.load(x_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x_lo), axis=0), tl.max(tl.abs(x_hi), axis=0))
    scale = _scale_of(absmax, 7.0)
    lo = (_round_clamp(x_lo * scale, 7.0) + 8.0).to(tl.int32)
    hi = (_round_clamp(x_hi * scale, 7.0) + 8.0).to(tl.int32)
    byte = (lo | (hi << 4)).to(tl.uint8)
    tl.store(q_ptr + pid.to(tl.int64) * (BLOCK // 2) + half, byte, mask=even < n)
    tl.store(absmax_ptr + pid, absmax)


@triton.jit
def _dequantize_int8_kernel(q_ptr, absmax_ptr, out_ptr, n, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    step = tl.div_rn(tl.load(absmax_ptr + pid), tl.full((), 127.0, tl.float32))
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, (q * step).to(OUT_DTYPE), mask=mask)


@triton.jit
def _dequantize_int4_kernel(q_ptr, absmax_ptr, out_ptr, n, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    half = tl.arange(0, BLOCK // 2)
    even = pid.to(tl.int64) * BLOCK + 2 * half
    step = tl.div_rn(tl.load(absmax_ptr + pid), tl.full((), 7.0, tl.float32))
    byte = tl.load(q_ptr + pid.to(tl.int64) * (BLOCK // 2) + half, mask=even < n, other=0).to(tl.int32)
    lo = ((byte & 15) - 8).to(tl.float32)
    hi = ((byte >> 4) - 8).to(tl.float32)
    tl.store(out_ptr + even, (lo * step).to(OUT_DTYPE), mask=even < n)
    tl.store(out_ptr + even + 1, (hi * step).to(OUT_DTYPE), mask=even + 1 < n)


def _check_input(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"{what}: dtype {x.dtype} is not supported; use float32, bfloat16 or float16")


def quantize_blockwise_launch(x: torch.Tensor, block_size: int = 64, bits: int = 8):
    """Quantize ``x`` (any shape, flattened) to ``(codes, absmax)``; see :func:`ds_ops.quant.quantize_blockwise`."""
    _check_input(x, "quantize_blockwise")
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    blocks = triton.cdiv(n, block_size)
    absmax = torch.empty(blocks, dtype=torch.float32, device=x.device)
    if bits == 8:
        q = torch.empty(n, dtype=torch.int8, device=x.device)
        kernel = _quantize_int8_kernel
    else:
        q = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
        kernel = _quantize_int4_kernel
    if blocks:
        kernel[(blocks,)](flat, q, absmax, n, BLOCK=block_size)
    return q, absmax


def dequantize_blockwise_launch(
    q: torch.Tensor,
    absmax: torch.Tensor,
    shape: list[int],
    block_size: int = 64,
    bits: int = 8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_launch`: a tensor of ``shape`` and ``dtype``."""
    out = torch.empty(shape, dtype=dtype, device=q.device)
    _check_input(out, "dequantize_blockwise")
    n = out.numel()
    blocks = triton.cdiv(n, block_size)
    kernel = _dequantize_int8_kernel if bits == 8 else _dequantize_int4_kernel
    if blocks:
        kernel[(blocks,)](q.contiguous(), absmax.float().contiguous(), out, n, _TL_DTYPES[dtype], BLOCK=block_size)
    return out
