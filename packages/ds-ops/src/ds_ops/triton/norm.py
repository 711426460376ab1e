"""Fused LayerNorm and RMSNorm, forward and backward, in Triton.

Inputs are viewed as ``(M, N)`` rows (``N`` = the normalized size); one kernel serves both norms
through the ``RMS`` flag. Forward: one program per row computes the statistics in fp32, writes
``y`` and saves ``mean``/``rstd`` (fp32, one per row) for backward.

Backward, with ``xhat`` the normalized row and ``g = dy * w`` (Ba et al., "Layer Normalization";
Zhang & Sennrich, "Root Mean Square Layer Normalization", the same with no mean):

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g))     (the mean(g) term only for LayerNorm)
    dw = sum over rows of dy * xhat,   db = sum over rows of dy

Each backward program walks rows ``pid, pid + G, ...`` writing ``dx`` and keeps its share of
``dw``/``db`` in registers, stored once to a ``(G, N)`` fp32 buffer that one ``sum(0)`` reduces,
so no atomics and a deterministic result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["norm_fwd_launch", "norm_bwd_launch", "MAX_N"]

MAX_N = 65536  # one row must fit a program's registers; longer rows use the op's default

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, eps,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row, mean)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, M, N, G,
    RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(pid, M, G):
        base = tl.cast(row, tl.int64) * N
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / N)
        if not RMS:
            dx = dx - tl.sum(g, axis=0) / N
        tl.store(dx_ptr + base + cols, (dx * rstd).to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(dw_part_ptr + pid * N + cols, dw_acc, mask=mask)
    if not RMS:
        tl.store(db_part_ptr + pid * N + cols, db_acc, mask=mask)


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


def norm_fwd_launch(x: torch.Tensor, n: int, weight, bias, eps: float, rms: bool):
    """``(y, mean, rstd)`` for LayerNorm (``rms=False``) or ``(y, rstd, rstd)`` for RMSNorm over the
    last ``n`` elements of each row of ``x``; ``mean``/``rstd`` are fp32 of shape ``(rows,)``."""
    x2 = x.reshape(-1, n).contiguous()
    m = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = rstd if rms else torch.empty(m, dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(n)
    w = weight.reshape(-1).contiguous() if weight is not None else x2
    b = bias.reshape(-1).contiguous() if bias is not None else x2
    if m:
        _norm_fwd_kernel[(m,)](
            x2, w, b, y, mean, rstd, n, eps, RMS=rms, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )  # fmt: skip
    return y.reshape(x.shape), mean, rstd


def norm_bwd_launch(dy, x, n: int, weight, mean, rstd, rms: bool, programs: int | None = None):
    """``(dx, dw, db)`` in fp32 for dw/db (``db`` is None for RMSNorm); see module docstring."""
    x2 = x.reshape(-1, n).contiguous()
    dy2 = dy.reshape(-1, n).contiguous()
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count * 4 if x.is_cuda else 8
    g = max(1, min(programs, m))
    dw_part = torch.zeros(g, n, dtype=torch.float32, device=x.device)
    db_part = dw_part if rms else torch.zeros(g, n, dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(n)
    w = weight.reshape(-1).contiguous() if weight is not None else x2
    if m:
        _norm_bwd_kernel[(g,)](
            dy2, x2, w, mean, rstd, dx, dw_part, db_part, m, n, g, RMS=rms,
            HAS_W=weight is not None, BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )  # fmt: skip
    return dx.reshape(x.shape), dw_part.sum(0), None if rms else db_part.sum(0)
