"""Lamb and Lion in plain PyTorch, for when no kernel package offers them (torch.optim has neither).

- :class:`Lamb` — You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
  minutes" (Algorithm 2): the bias-corrected Adam direction plus decoupled weight decay, rescaled per
  tensor by the trust ratio ``||w|| / ||update||``. The ratio is clamped to ``[min_coeff, max_coeff]``
  as DeepSpeed's FusedLamb does, and ``max_grad_norm`` / ``eps_inside_sqrt`` keep FusedLamb's meaning.
- :class:`Lion` — Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms" (Algorithm 2):
  the update is the sign of an interpolation of momentum and gradient, so every coordinate moves by
  exactly ``lr``; weight decay is decoupled. Defaults are DeepSpeed's FusedLion ones.

Both keep their state in the parameter's dtype and never synchronise with the host inside ``step``
(the trust ratio stays a tensor), so they run unchanged on any device torch supports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["Lamb", "Lion"]


def _check_betas(betas: Any) -> tuple[float, float]:
    beta1, beta2 = betas
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas {tuple(betas)} must both lie in [0, 1), e.g. (0.9, 0.999)")
    return float(beta1), float(beta2)


def _norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm accumulated in at least fp32 (16-bit sums lose too much)."""
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32))


def _dense_grad(p: torch.Tensor, name: str) -> torch.Tensor:
    if p.grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients; use a dense embedding or SparseAdam")
    return p.grad


class Lamb(Optimizer):
    """Layer-wise adaptive moments (LAMB), pure PyTorch.

    Per parameter tensor ``w`` with gradient ``g`` at step ``t`` (You et al. 2019, Algorithm 2)::

        m = b1*m + (1-b1)*g                     v = b2*v + (1-b2)*g*g
        r = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)  + weight_decay * w
        trust = clamp(||w|| / ||r||, min_coeff, max_coeff)   (1 when either norm is 0)
        w = w - lr * trust * r

    ``bias_correction=False`` drops the ``1-b^t`` factors; ``eps_inside_sqrt=True`` uses
    ``sqrt(v_hat + eps)``; ``max_grad_norm > 0`` first scales the group's gradients down so that their
    global norm is at most ``max_grad_norm`` (FusedLamb's clipping).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        eps_inside_sqrt: bool = False,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr {lr} must be >= 0")
        if eps < 0.0:
            raise ValueError(f"eps {eps} must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        if max_grad_norm < 0.0:
            raise ValueError(f"max_grad_norm {max_grad_norm} must be >= 0 (0 disables clipping)")
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(f"need 0 <= min_coeff <= max_coeff, got min_coeff {min_coeff}, max_coeff {max_coeff}")
        defaults = dict(lr=lr, betas=_check_betas(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt,
                        max_grad_norm=max_grad_norm, max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [_dense_grad(p, "Lamb") for p in params]
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]

            clip: torch.Tensor | None = None
            if group["max_grad_norm"] > 0:
                # FusedLamb: divide by (||g|| + 1e-6) / max_grad_norm when that exceeds 1.
                norms = torch.stack([_norm(g) for g in grads])
                total = torch.linalg.vector_norm(norms)
                clip = ((total + 1e-6) / group["max_grad_norm"]).clamp(min=1.0)

            for p, grad in zip(params, grads):
                if clip is not None:
                    grad = grad / clip.to(grad.dtype)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

                if group["bias_correction"]:
                    correction1, correction2 = 1.0 - beta1**t, 1.0 - beta2**t
                else:
                    correction1 = correction2 = 1.0
                if group["eps_inside_sqrt"]:
                    denom = (exp_avg_sq / correction2).add_(eps).sqrt_()
                else:
                    denom = (exp_avg_sq / correction2).sqrt_().add_(eps)
                update = (exp_avg / correction1).div_(denom)
                if decay != 0:
                    update.add_(p, alpha=decay)

                w_norm = _norm(p)
                u_norm = _norm(update)
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                trust = ratio.clamp(group["min_coeff"], group["max_coeff"])
                p.add_(update.mul_(trust.to(update.dtype)), alpha=-lr)
        return loss


class Lion(Optimizer):
    """Evolved sign momentum (Lion), pure PyTorch.

    Per parameter tensor ``w`` with gradient ``g`` (Chen et al. 2023, Algorithm 2)::

        c = b1*m + (1-b1)*g
        w = w - lr * (sign(c) + weight_decay * w)
        m = b2*m + (1-b2)*g

    The paper suggests an lr 3-10x smaller than AdamW's and a weight decay 3-10x larger, with
    betas (0.9, 0.99); the defaults here are DeepSpeed's (lr 1e-3, betas (0.9, 0.999)).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr {lr} must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        super().__init__(params, dict(lr=lr, betas=_check_betas(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = _dense_grad(p, "Lion")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                direction = torch.lerp(exp_avg, grad, 1.0 - beta1).sign_()
                if decay != 0:
                    p.mul_(1.0 - lr * decay)
                p.add_(direction, alpha=-lr)
                exp_avg.lerp_(grad, 1.0 - beta2)
        return loss
