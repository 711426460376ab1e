"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), on the shared group-wise quantizer.

For a linear layer with inputs ``X`` the layer-wise objective ``||W X - Q X||^2`` has Hessian
``H = 2 X X^T``. GPTQ quantizes the input columns one at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian (the Optimal Brain
Surgeon update, Algorithm 1 of the paper). The inverse is taken once, through the upper Cholesky
factor of ``H^-1`` (the paper's numerically stable form), and updates are applied lazily per block
of columns. ``act_order`` processes columns by decreasing ``diag(H)`` (the most activated first);
the codes are then laid out over the permuted columns and the layer records the permutation, which
is exactly the ds-quant ``perm`` convention. ``damp`` adds ``damp * mean(diag(H))`` to the diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quantizer import QuantizedWeight, QuantSpec, compute_qparams, decode, encode

__all__ = ["HessianAccumulator", "gptq_quantize"]


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over every input vector (token) a layer sees."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def gptq_quantize(weight: Tensor, H: Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = True,
                  block_size: int = 128) -> tuple[QuantizedWeight, Tensor | None]:
    """Quantize ``weight`` ``[out, in]`` given its input Hessian; returns the codes and the permutation
    (``None`` without act-order). Scales are stored in ``weight``'s dtype."""
    dtype = weight.dtype
    W = weight.detach().float().clone()
    H = H.clone()
    out, n = W.shape
    dead = torch.diag(H) == 0  # inputs never seen: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    gs = n if spec.group_size == -1 else spec.group_size
    if gs < n:
        block_size = gs * max(1, block_size // gs)  # a group never straddles two blocks
    groups = n // gs
    scales = torch.empty(out, groups, dtype=dtype, device=W.device)
    zeros = None if spec.symmetric or spec.bits == 1 else torch.empty(out, groups, dtype=dtype, device=W.device)
    codes = torch.empty(out, n, dtype=torch.int16, device=W.device)
    one = QuantSpec(spec.bits, -1, spec.symmetric)  # per-column encode against a group's scales

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        E = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            g = col // gs
            if col % gs == 0:  # the group's scales, from its columns as updated so far
                span = W1[:, j:j + gs] if gs <= i2 - col else W[:, col:col + gs]
                s, z = compute_qparams(span, QuantSpec(spec.bits, -1, spec.symmetric))
                scales[:, g] = s[:, 0].to(dtype)
                if zeros is not None:
                    zeros[:, g] = z[:, 0].to(dtype)
            s_col = scales[:, g:g + 1]
            z_col = zeros[:, g:g + 1] if zeros is not None else None
            w = W1[:, j:j + 1]
            q = encode(w, s_col, z_col, one)
            codes[:, col] = q[:, 0]
            err = (w[:, 0] - decode(q, s_col, z_col, one)[:, 0]) / U1[j, j]
            W1[:, j + 1:] -= err[:, None] * U1[j, j + 1:][None, :]
            E[:, j] = err
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return QuantizedWeight(codes, scales, zeros, spec), perm
