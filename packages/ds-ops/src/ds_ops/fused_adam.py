"""``ds_ops::fused_adam``: multi-tensor Adam/AdamW step, and the :class:`FusedAdam` optimizer on it.

The op updates a whole list of tensors in one call: fp32 master weights and state, grads in any
float dtype, and optionally a bf16/fp16 model copy of each weight written in the same pass. Its
default is a per-tensor PyTorch loop in the operation order of ``torch.optim.AdamW``; on "cuda" the
Triton kernel in :mod:`ds_ops.triton.adam` does the same in one launch. Without Triton the "cuda"
kernel runs the default, so the op always exists.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import triton as _triton
from .registry import custom_op, register_kernel

__all__ = ["fused_adam", "fused_adam_reference", "FusedAdam"]


def _check_lists(params, grads, exp_avgs, exp_avg_sqs, model_params) -> None:
    n = len(params)
    lengths = {"grads": len(grads), "exp_avgs": len(exp_avgs), "exp_avg_sqs": len(exp_avg_sqs)}
    if model_params:
        lengths["model_params"] = len(model_params)
    for name, length in lengths.items():
        if length != n:
            raise ValueError(
                f"fused_adam: {name} has {length} tensors but params has {n}; pass one per param "
                "(model_params may also be empty)"
            )
    for i, p in enumerate(params):
        for name, other in (("grads", grads[i]), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])):
            if other.shape != p.shape:
                raise ValueError(
                    f"fused_adam: {name}[{i}] has shape {tuple(other.shape)} but params[{i}] has "
                    f"{tuple(p.shape)}; state and grads must match their param"
                )


def fused_adam_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    model_params: list[Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool = True,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
) -> None:
    """Pure-PyTorch Adam/AdamW step over lists (the op's default and the kernels' reference)."""
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, model_params)
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2_sqrt = (1.0 - beta2**step) ** 0.5 if bias_correction else 1.0
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        g = g.to(p.dtype)
        if grad_scale != 1.0:
            g = g * (1.0 / grad_scale)
        if adamw:
            p.mul_(1.0 - lr * weight_decay)
        elif weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
        if model_params:
            model_params[i].copy_(p)


@custom_op("fused_adam", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "model_params"))
def fused_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    model_params: list[Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool = True,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
) -> None:
    """One Adam (``adamw=False``, L2 decay) or AdamW step over every tensor of the lists, in place.

    ``step`` is the 1-based step count used for bias correction; grads are divided by
    ``grad_scale`` first (pass the loss scale to unscale fp16 grads in the same pass);
    ``model_params``, when not empty, receive the updated weights cast to their dtype.
    """
    fused_adam_reference(
        params, grads, exp_avgs, exp_avg_sqs, model_params, step, lr, beta1, beta2, eps,
        weight_decay, adamw, bias_correction, grad_scale,
    )  # fmt: skip


def _fused_adam_cuda(params, grads, exp_avgs, exp_avg_sqs, model_params, step, lr, beta1, beta2, eps,
                     weight_decay, adamw=True, bias_correction=True, grad_scale=1.0):  # fmt: skip
    args = (params, grads, exp_avgs, exp_avg_sqs, model_params, step, lr, beta1, beta2, eps, weight_decay,
            adamw, bias_correction, grad_scale)  # fmt: skip
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, model_params)
    if not _triton.available():
        return fused_adam_reference(*args)
    from .triton.adam import fused_adam_launch, unsupported_reason

    if unsupported_reason(params, grads, exp_avgs, exp_avg_sqs, model_params) is not None:
        return fused_adam_reference(*args)  # odd layouts or dtypes: correct first, fast when possible
    fused_adam_launch(*args)


register_kernel("fused_adam", "cuda", _fused_adam_cuda, kernel="triton (ds_ops.triton.adam)", status=_triton.status)


@fused_adam.register_fake
def _fused_adam_fake(*args, **kwargs) -> None:
    return None


class FusedAdam(torch.optim.Optimizer):
    """Adam/AdamW over :func:`fused_adam`: one op call per (device, dtype) group of parameters.

    Parameters that are not float32 (bf16/fp16 models) get an fp32 master copy in the optimizer
    state; the op updates the master and writes the model weight back in the same pass. With
    ``adam_w_mode=True`` (the default, as DeepSpeed's FusedAdam) decay is decoupled (AdamW);
    otherwise it is L2 decay added to the grad (Adam). Results match ``torch.optim.AdamW`` /
    ``torch.optim.Adam`` to float rounding.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"FusedAdam: lr={lr}, eps={eps}, weight_decay={weight_decay} must all be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"FusedAdam: betas={betas} must each be in [0, 1)")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        adam_w_mode=adam_w_mode, weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)

    def _state_of(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            master = p.detach().float() if p.dtype != torch.float32 else p.detach()
            if p.dtype != torch.float32:
                state["master"] = master.clone(memory_format=torch.contiguous_format)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdam: sparse gradients are not supported; use torch.optim.SparseAdam")
                state = self._state_of(p)
                state["step"] += 1
                buckets[(p.device, p.grad.dtype, p.dtype, state["step"])].append(p)
            beta1, beta2 = group["betas"]
            for (_, _, dtype, step), ps in buckets.items():
                states = [self.state[p] for p in ps]
                low_precision = dtype != torch.float32
                torch.ops.ds_ops.fused_adam(
                    [s["master"] if low_precision else p for s, p in zip(states, ps)],
                    [p.grad.contiguous() for p in ps],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    ps if low_precision else [],
                    step,
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                    group["adam_w_mode"],
                    group["bias_correction"],
                )
        return loss
