"""Weight-only quantized GEMM in Triton: ``y = x · Wᵀ`` with ``W`` as packed ds-quant codes.

One program computes a ``BLOCK_M × BLOCK_N`` tile of ``y``. It walks the input dimension in
``BLOCK_K`` steps: loads the ``x`` tile, loads the code bytes of the ``W`` tile (byte ``k // P`` of
the row holds column ``k``, P = 8 / bits columns per byte, lowest column in the lowest bits),
extracts each field with a shift and a mask, dequantizes it in registers as
``(a · field − offset) · scale`` with the scale (and zero point) of the column's group, and
accumulates ``tl.dot`` in fp32. The weight never exists dequantized in memory: the traffic is the
packed bytes plus one scale per group, which is what makes decoding (memory-bound) faster.
``offset`` is ``2^(bits−1)`` for symmetric 4/2-bit codes, the stored zero point for asymmetric
ones, 0 for int8 and 1 for binary codes (with ``a = 2``), as in :mod:`ds_ops.woq`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["woq_linear_launch"]

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _woq_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G, GROUP, ROW_BYTES, OFF, A,
                BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, OUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    P: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        wmask = mask_n[:, None] & mask_k[None, :]
        byte = tl.load(q_ptr + offs_n[:, None].to(tl.int64) * ROW_BYTES + (offs_k[None, :] // P),
                       mask=wmask, other=0)
        if SIGNED:
            field = byte.to(tl.int8).to(tl.float32)
        else:
            shift = (offs_k[None, :] % P) * BITS
            field = ((byte.to(tl.int32) >> shift) & MASK).to(tl.float32)
        g = offs_k[None, :] // GROUP
        scale = tl.load(s_ptr + offs_n[:, None].to(tl.int64) * G + g, mask=wmask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            off = tl.load(z_ptr + offs_n[:, None].to(tl.int64) * G + g, mask=wmask, other=0.0).to(tl.float32)
        else:
            off = OFF
        w = (A * field - off) * scale  # [BLOCK_N, BLOCK_K]
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(OUT),
             mask=mask_m[:, None] & mask_n[None, :])


def woq_linear_launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """``x [M, K]`` times the dequantized ``[N, K]`` weight, transposed; output in ``x.dtype``."""
    if x.dtype not in _TL:
        raise ValueError(f"woq_linear: activation dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
    m, k = x.shape
    n = qweight.shape[0]
    group = k if group_size == -1 else group_size
    off, a = offsets(bits, symmetric)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    has_zeros = zeros is not None and not symmetric and bits > 1
    _woq_kernel[grid](x.contiguous(), qweight.contiguous(), scales.contiguous(),
                      zeros.contiguous() if has_zeros else scales, y, m, n, k, k // group, group,
                      qweight.shape[1], off, a, BITS=bits, SIGNED=bits == 8 and symmetric, HAS_ZEROS=has_zeros,
                      OUT=_TL[x.dtype], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def offsets(bits: int, symmetric: bool) -> tuple[float, float]:
    """``(offset, a)`` of ``w = (a·field − offset)·scale`` when no zero points are stored."""
    if bits == 1:
        return 1.0, 2.0
    if bits == 8 or not symmetric:
        return 0.0, 1.0
    return float(2 ** (bits - 1)), 1.0
