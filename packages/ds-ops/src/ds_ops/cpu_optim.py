"""CPU optimizer steps over flat fp32 buffers (the ZeRO-Offload update) and drop-in optimizers.

Three ops, each updating its buffers in place and optionally writing the new params into a bf16 or
fp16 buffer in the same pass (the copy ZeRO-Offload sends back to the accelerator):

- ``ds_ops::adam_step``    Adam / AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019)
- ``ds_ops::adagrad_step`` Adagrad (Duchi et al. 2011) with torch.optim's lr_decay
- ``ds_ops::lion_step``    Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")

The decorated functions are the pure-PyTorch defaults; they repeat torch.optim's single-tensor
arithmetic, as does the C++ CPU kernel (csrc/cpu_optim.cpp, built on first call). ``step`` is the
1-based step count *after* incrementing, as in torch.optim, and drives the bias corrections.
``grad_scale`` multiplies the gradient as it is read (loss-scale unscaling times the clipping
coefficient): the same numbers as ``grad.mul_(grad_scale)`` before the step, without that extra pass
over memory; the grad buffer itself is left as it was.

:class:`DSCPUAdam`, :class:`DSCPUAdagrad` and :class:`DSCPULion` wrap the ops as
``torch.optim.Optimizer`` subclasses whose state uses torch.optim's keys (``step``, ``exp_avg``,
``exp_avg_sq``, ``sum``), so their state dicts load into torch.optim and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import build
from .registry import OpInputError, custom_op, register_kernel, register_optimizer

__all__ = [
    "adam_step",
    "adagrad_step",
    "lion_step",
    "DSCPUAdam",
    "DSCPUAdagrad",
    "DSCPULion",
]

_COPY_DTYPES = {torch.bfloat16: 1, torch.float16: 2}


def _check(op: str, param: Tensor, named: dict[str, Tensor], copy: Tensor | None) -> None:
    """Flat-buffer contract: same numel, fp32, contiguous, same device; copy bf16/fp16."""
    for label, t in {"param": param, **named}.items():
        if t.dtype != torch.float32:
            raise OpInputError(f"ds_ops::{op}: {label} is {t.dtype}, the op updates fp32 buffers; "
                               "keep an fp32 master copy and pass that")
        if not t.is_contiguous():
            raise OpInputError(f"ds_ops::{op}: {label} (shape {tuple(t.shape)}, stride {t.stride()}) is "
                               "not contiguous; pass .contiguous() buffers or a view of a flat buffer")
        if t.numel() != param.numel():
            raise OpInputError(f"ds_ops::{op}: {label} has {t.numel()} elements but param has "
                               f"{param.numel()}; every buffer must cover the same elements")
        if t.device != param.device:
            raise OpInputError(f"ds_ops::{op}: {label} is on {t.device} but param is on {param.device}")
    if copy is not None:
        if copy.dtype not in _COPY_DTYPES:
            raise OpInputError(f"ds_ops::{op}: param_copy is {copy.dtype}; it must be torch.bfloat16 "
                               "or torch.float16 (or None)")
        if copy.numel() != param.numel() or not copy.is_contiguous() or copy.device != param.device:
            raise OpInputError(f"ds_ops::{op}: param_copy must be a contiguous buffer of {param.numel()} "
                               f"elements on {param.device}; got {copy.numel()} elements on {copy.device}"
                               f"{'' if copy.is_contiguous() else ', not contiguous'}")


def _check_step(op: str, step: int) -> None:
    if step < 1:
        raise OpInputError(f"ds_ops::{op}: step={step}; it is the 1-based count after incrementing "
                           "(call with 1 on the first update)")


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_scale(op: str, grad_scale: float) -> None:
    if not math.isfinite(grad_scale):
        raise OpInputError(f"ds_ops::{op}: grad_scale={grad_scale!r} must be finite; on a loss-scale "
                           "overflow skip the step instead of stepping with an infinite scale")


def _scaled(grad: Tensor, grad_scale: float) -> Tensor:
    """``grad * grad_scale`` as a new tensor (the caller's grad is not written); grad when 1."""
    return grad if grad_scale == 1.0 else grad.mul(grad_scale)


# ---------------------------------------------------------------------------------------------- Adam


@custom_op("adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq", "param_copy"))
def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
              param_copy: Tensor | None, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float, step: int, adamw_mode: bool, grad_scale: float = 1.0) -> None:
    """One Adam (``adamw_mode=False``, L2 in the gradient) or AdamW step, in place."""
    _check("adam_step", param, {"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
           param_copy)
    _check_step("adam_step", step)
    _check_scale("adam_step", grad_scale)
    _adam_default(param, grad, exp_avg, exp_avg_sq, param_copy, lr, beta1, beta2, eps, weight_decay,
                  step, adamw_mode, grad_scale)


def _adam_default(param, grad, exp_avg, exp_avg_sq, param_copy, lr, beta1, beta2, eps, weight_decay,
                  step, adamw_mode, grad_scale=1.0):
    # torch.optim.adam._single_tensor_adam, operation for operation
    grad = _scaled(grad, grad_scale)
    if weight_decay != 0:
        if adamw_mode:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
    if param_copy is not None:
        param_copy.copy_(param)


def _adam_cpu(param, grad, exp_avg, exp_avg_sq, param_copy, lr, beta1, beta2, eps, weight_decay,
              step, adamw_mode, grad_scale=1.0):
    _check("adam_step", param, {"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
           param_copy)
    _check_step("adam_step", step)
    _check_scale("adam_step", grad_scale)
    ext = build.load_or_none("cpu_optim")
    if ext is None:
        return _adam_default(param, grad, exp_avg, exp_avg_sq, param_copy, lr, beta1, beta2, eps,
                             weight_decay, step, adamw_mode, grad_scale)
    kind = 0 if param_copy is None else _COPY_DTYPES[param_copy.dtype]
    ext.adam_step(param.numel(), param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(),
                  exp_avg_sq.data_ptr(), _ptr(param_copy), kind, lr, beta1, beta2, eps, weight_decay,
                  step, adamw_mode, grad_scale)


# ------------------------------------------------------------------------------------------- Adagrad


@custom_op("adagrad_step", mutates_args=("param", "state_sum", "param_copy"))
def adagrad_step(param: Tensor, grad: Tensor, state_sum: Tensor, param_copy: Tensor | None, lr: float,
                 eps: float, weight_decay: float, lr_decay: float, step: int,
                 grad_scale: float = 1.0) -> None:
    """One Adagrad step, in place (torch.optim.Adagrad's update, including lr_decay)."""
    _check("adagrad_step", param, {"grad": grad, "state_sum": state_sum}, param_copy)
    _check_step("adagrad_step", step)
    _check_scale("adagrad_step", grad_scale)
    _adagrad_default(param, grad, state_sum, param_copy, lr, eps, weight_decay, lr_decay, step,
                     grad_scale)


def _adagrad_default(param, grad, state_sum, param_copy, lr, eps, weight_decay, lr_decay, step,
                     grad_scale=1.0):
    # torch.optim.adagrad._single_tensor_adagrad (dense gradients)
    grad = _scaled(grad, grad_scale)
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum.addcmul_(grad, grad, value=1)
    std = state_sum.sqrt().add_(eps)
    param.addcdiv_(grad, std, value=-clr)
    if param_copy is not None:
        param_copy.copy_(param)


def _adagrad_cpu(param, grad, state_sum, param_copy, lr, eps, weight_decay, lr_decay, step,
                 grad_scale=1.0):
    _check("adagrad_step", param, {"grad": grad, "state_sum": state_sum}, param_copy)
    _check_step("adagrad_step", step)
    _check_scale("adagrad_step", grad_scale)
    ext = build.load_or_none("cpu_optim")
    if ext is None:
        return _adagrad_default(param, grad, state_sum, param_copy, lr, eps, weight_decay, lr_decay,
                                step, grad_scale)
    kind = 0 if param_copy is None else _COPY_DTYPES[param_copy.dtype]
    ext.adagrad_step(param.numel(), param.data_ptr(), grad.data_ptr(), state_sum.data_ptr(),
                     _ptr(param_copy), kind, lr, eps, weight_decay, lr_decay, step, grad_scale)


# ---------------------------------------------------------------------------------------------- Lion


@custom_op("lion_step", mutates_args=("param", "exp_avg", "param_copy"))
def lion_step(param: Tensor, grad: Tensor, exp_avg: Tensor, param_copy: Tensor | None, lr: float,
              beta1: float, beta2: float, weight_decay: float, grad_scale: float = 1.0) -> None:
    """One Lion step, in place (Chen et al. 2023, Algorithm 2)."""
    _check("lion_step", param, {"grad": grad, "exp_avg": exp_avg}, param_copy)
    _check_scale("lion_step", grad_scale)
    _lion_default(param, grad, exp_avg, param_copy, lr, beta1, beta2, weight_decay, grad_scale)


def _lion_default(param, grad, exp_avg, param_copy, lr, beta1, beta2, weight_decay, grad_scale=1.0):
    grad = _scaled(grad, grad_scale)
    # c = b1 m + (1 - b1) g;  p -= lr (sign(c) + wd p);  m = b2 m + (1 - b2) g
    c = exp_avg * beta1 + grad * (1 - beta1)
    param.sub_((torch.sign(c) + param * weight_decay) * lr)
    exp_avg.copy_(exp_avg * beta2 + grad * (1 - beta2))
    if param_copy is not None:
        param_copy.copy_(param)


def _lion_cpu(param, grad, exp_avg, param_copy, lr, beta1, beta2, weight_decay, grad_scale=1.0):
    _check("lion_step", param, {"grad": grad, "exp_avg": exp_avg}, param_copy)
    _check_scale("lion_step", grad_scale)
    ext = build.load_or_none("cpu_optim")
    if ext is None:
        return _lion_default(param, grad, exp_avg, param_copy, lr, beta1, beta2, weight_decay,
                             grad_scale)
    kind = 0 if param_copy is None else _COPY_DTYPES[param_copy.dtype]
    ext.lion_step(param.numel(), param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(),
                  _ptr(param_copy), kind, lr, beta1, beta2, weight_decay, grad_scale)


def _cpu_status() -> str:
    return build.describe("cpu_optim")


for _name, _op, _fn in (("adam_step", adam_step, _adam_cpu), ("adagrad_step", adagrad_step, _adagrad_cpu),
                        ("lion_step", lion_step, _lion_cpu)):
    _op.register_fake(lambda *args, **kwargs: None)  # no outputs: torch.compile needs no shapes
    register_kernel(_name, "cpu", _fn, kernel="c++ jit (csrc/cpu_optim.cpp)",
                    status=_cpu_status)


# ------------------------------------------------------------------------------------- optimizers


def _check_hparam(cls: str, name: str, value: float, low: float, high: float | None = None) -> None:
    ok = value >= low and (high is None or value < high) and math.isfinite(value)
    if not ok:
        rule = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{cls}: {name}={value!r} must be {rule}")


class _FlatCPUOptimizer(torch.optim.Optimizer):
    """Shared loop: validate each param, create state lazily, bump ``step``, call the op.

    The optimizers call this module's CPU kernels directly, not through ``torch.ops.ds_ops`` — the
    same function the dispatcher would reach for CPU tensors, without its Python layers (about half a
    millisecond per tensor, which for a model of a few hundred parameter tensors is most of a step).
    """

    _state_keys: tuple[str, ...] = ()
    # step() keywords that fold work into the one pass: wrappers (ds-core's engine, ZeRO) look for
    # these to hand over the unscale/clip coefficient and the model-dtype copy instead of doing both
    # as separate passes over memory.
    fused_step_args = ("grad_scale", "copy_to")

    def _params_with_grads(self, group: dict, copies: Sequence[Tensor | None] | None):
        name = type(self).__name__
        if copies is not None and len(copies) != len(group["params"]):
            raise OpInputError(f"{name}.step: copy_to has {len(copies)} buffers for a group of "
                               f"{len(group['params'])} params; give one (or None) per param")
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.device.type != "cpu" or p.grad.device.type != "cpu":
                raise OpInputError(f"{name} updates CPU params; param {i} is on {p.device} (grad on "
                                   f"{p.grad.device}); use torch.optim on that device")
            if p.grad.is_sparse:
                raise OpInputError(f"{name}: param {i} has a sparse gradient; only dense gradients "
                                   "are supported")
            if p.grad.shape != p.shape:
                raise OpInputError(f"{name}: param {i} has shape {tuple(p.shape)} but its grad has "
                                   f"{tuple(p.grad.shape)}")
            yield p, (None if copies is None else copies[i])

    def _state(self, p: Tensor, init: Callable[[Tensor], dict]) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state.update(init(p))
        elif not torch.is_tensor(state["step"]):
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        state["step"] += 1
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None,
             copy_to: Sequence[Sequence[Tensor | None]] | None = None, grad_scale: float = 1.0):
        """Update every param with a grad. ``copy_to`` (one list per param group, one bf16/fp16
        buffer or None per param) receives the new params in the same pass; ``grad_scale``
        multiplies every gradient as it is read (unscale x clip coefficient; grads are not written)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if copy_to is not None and len(copy_to) != len(self.param_groups):
            raise OpInputError(f"{type(self).__name__}.step: copy_to has {len(copy_to)} lists for "
                               f"{len(self.param_groups)} param groups")
        for gi, group in enumerate(self.param_groups):
            copies = None if copy_to is None else copy_to[gi]
            for p, copy in self._params_with_grads(group, copies):
                self._update(group, p, copy, grad_scale)
        return loss

    def _update(self, group: dict, p: Tensor, copy: Tensor | None, grad_scale: float) -> None:
        raise NotImplementedError


class DSCPUAdam(_FlatCPUOptimizer):
    """Adam/AdamW on CPU through ``ds_ops::adam_step``; a drop-in for ``torch.optim.AdamW``
    (``adamw_mode=True``, the default) or ``torch.optim.Adam`` (``adamw_mode=False``).

    Matches torch.optim to float rounding (tested at rtol 1e-6 / atol 1e-7 after 10 steps).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, adamw_mode: bool = True):
        name = type(self).__name__
        _check_hparam(name, "lr", lr, 0.0)
        _check_hparam(name, "betas[0]", betas[0], 0.0, 1.0)
        _check_hparam(name, "betas[1]", betas[1], 0.0, 1.0)
        _check_hparam(name, "eps", eps, 0.0)
        _check_hparam(name, "weight_decay", weight_decay, 0.0)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      adamw_mode=adamw_mode))

    def _update(self, group, p, copy, grad_scale):
        state = self._state(p, lambda p: {
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)})
        beta1, beta2 = group["betas"]
        # a group loaded from torch.optim.AdamW/Adam has no adamw_mode key
        adamw = group.get("adamw_mode", group.get("decoupled_weight_decay", self.defaults["adamw_mode"]))
        _adam_cpu(p, p.grad, state["exp_avg"], state["exp_avg_sq"], copy,
                  group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                  int(state["step"].item()), bool(adamw), grad_scale)


class DSCPUAdagrad(_FlatCPUOptimizer):
    """Adagrad on CPU through ``ds_ops::adagrad_step``; a drop-in for ``torch.optim.Adagrad``."""

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10):
        name = type(self).__name__
        for key, value in (("lr", lr), ("lr_decay", lr_decay), ("weight_decay", weight_decay),
                           ("initial_accumulator_value", initial_accumulator_value), ("eps", eps)):
            _check_hparam(name, key, value, 0.0)
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps))

    def _update(self, group, p, copy, grad_scale):
        init = group["initial_accumulator_value"]
        state = self._state(p, lambda p: {
            "sum": torch.full_like(p, init, memory_format=torch.preserve_format)})
        _adagrad_cpu(p, p.grad, state["sum"], copy, group["lr"], group["eps"],
                     group["weight_decay"], group["lr_decay"],
                     int(state["step"].item()), grad_scale)


class DSCPULion(_FlatCPUOptimizer):
    """Lion on CPU through ``ds_ops::lion_step`` (Chen et al. 2023); state ``exp_avg`` and ``step``."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        name = type(self).__name__
        _check_hparam(name, "lr", lr, 0.0)
        _check_hparam(name, "betas[0]", betas[0], 0.0, 1.0)
        _check_hparam(name, "betas[1]", betas[1], 0.0, 1.0)
        _check_hparam(name, "weight_decay", weight_decay, 0.0)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def _update(self, group, p, copy, grad_scale):
        state = self._state(p, lambda p: {
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format)})
        beta1, beta2 = group["betas"]
        _lion_cpu(p, p.grad, state["exp_avg"], copy, group["lr"], beta1, beta2,
                  group["weight_decay"], grad_scale)


# the kernel optimizers ds-core's optimizer factory may use for fp32 CPU parameters
for _name, _cls in (("adam", DSCPUAdam), ("adamw", DSCPUAdam), ("adagrad", DSCPUAdagrad), ("lion", DSCPULion)):
    register_optimizer(_name, _cls)
