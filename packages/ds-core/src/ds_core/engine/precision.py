"""Precision: fp32, bf16 and fp16 training around flat fp32 gradient (and master-weight) buffers.

- fp32: the optimizer steps the model's own parameters; their ``.grad`` are views into one flat fp32
  buffer, so the gradient reducer all-reduces contiguous buckets with no copies.
- bf16 / fp16: the model holds 16-bit parameters; a flat fp32 copy (the master weights) is what the
  optimizer steps, gradients are accumulated in fp32 across micro-steps, and after each step the
  masters are copied back into the model (Micikevicius et al. 2018, "Mixed Precision Training").
- fp16 adds dynamic loss scaling with DeepSpeed's knobs and skips a step when any rank overflowed.
- Low-precision training state (``bf16.bf16_master_weights_and_grads``, ``bf16.bf16_optimizer_states``,
  ``fp16.fp16_master_weights_and_grads``, ``data_types.grad_accum_dtype``) changes only the dtypes of
  this choice: the masters are then the 16-bit model weights themselves, the accumulation buffer takes
  ``grad_dtype`` and the optimizer state ``state_dtype``; ``low_precision.py`` steps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..params import DEFAULT_AXIS, reduce_axis, shard_axis

__all__ = ["FlatGradients", "LossScaler", "DTYPES", "Precision"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The precision choice a strategy implements: the model's dtype, the dtype of the weights the
    optimizer steps, and whether the loss is scaled.

    ``master_dtype`` is ``None`` when the optimizer steps the model's own parameters (fp32); fp32 for
    bf16/fp16 models (separate fp32 masters); the model's 16-bit dtype with
    ``*_master_weights_and_grads`` (the model's weights are the masters). ``grad_dtype`` and
    ``state_dtype`` are the dtypes of the gradient buffers and of the optimizer state between steps.
    """

    name: str
    dtype: torch.dtype
    master_dtype: torch.dtype | None
    loss_scaling: bool
    #: dtype of the gradient accumulation buffers (``data_types.grad_accum_dtype``; the masters' dtype
    #: with ``*_master_weights_and_grads``)
    grad_dtype: torch.dtype = torch.float32
    #: dtype the optimizer state is kept in between steps (``bf16.bf16_optimizer_states``: bf16)
    state_dtype: torch.dtype = torch.float32
    #: how 16-bit masters take their update: "stochastic" (default) or "nearest" (round to nearest even)
    rounding: str = "stochastic"
    #: seed of the stochastic-rounding streams (the config's ``seed``, else 0)
    seed: int = 0

    @classmethod
    def from_name(cls, name: str) -> Precision:
        dtype = DTYPES[name]
        return cls(name, dtype, None if dtype == torch.float32 else torch.float32, name == "fp16")

    @classmethod
    def from_config(cls, config) -> Precision:
        """The precision a parsed config asks for (``config.precision`` plus the low-precision keys);
        contradictory keys raise a :class:`ConfigError` naming them and the fix."""
        base = cls.from_name(config.precision)
        bf16, fp16 = config.bf16, config.fp16
        master, state = base.master_dtype, torch.float32
        if getattr(bf16, "bf16_master_weights_and_grads", False):
            if base.name != "bf16":
                raise ConfigError(f"bf16.bf16_master_weights_and_grads keeps the masters in the bf16 model's "
                                  f"dtype, but this run is {base.name}; set bf16.enabled true or drop the key")
            master = torch.bfloat16
        if getattr(bf16, "bf16_optimizer_states", False):
            if base.name != "bf16":
                raise ConfigError(f"bf16.bf16_optimizer_states keeps optimizer state in bf16, which needs a bf16 "
                                  f"run (this one is {base.name}); set bf16.enabled true or drop the key")
            state = torch.bfloat16
        if getattr(fp16, "fp16_master_weights_and_grads", False):
            if base.name != "fp16":
                raise ConfigError(f"fp16.fp16_master_weights_and_grads keeps the masters in the fp16 model's "
                                  f"dtype, but this run is {base.name}; set fp16.enabled true or drop the key")
            master = torch.float16
        low_master = master is not None and master != torch.float32
        accum = getattr(getattr(config, "data_types", None), "grad_accum_dtype", None)
        grad = DTYPES[accum] if accum else (master if low_master else torch.float32)
        if low_master and grad != master:
            raise ConfigError(f"data_types.grad_accum_dtype {accum!r} contradicts {base.name}_master_weights_and_"
                              f"grads, which keeps the gradients in the masters' dtype ({base.name}); drop one "
                              f"of the two keys")
        if grad == torch.float16 and not base.loss_scaling:
            raise ConfigError(f"data_types.grad_accum_dtype 'fp16' accumulates gradients in fp16 without loss "
                              f"scaling (this run is {base.name}), where gradients below 6e-8 vanish; use "
                              f"'bf16' (fp32's range), or enable fp16 with its loss scaling")
        seed = getattr(config, "seed", None) or 0
        rounding = getattr(getattr(config, "data_types", None), "master_weights_rounding", "stochastic")
        spec = cls(base.name, base.dtype, master, base.loss_scaling, grad, state, rounding, int(seed))
        if spec.low_precision:
            _check_supported(spec, config)
        return spec

    @property
    def has_masters(self) -> bool:
        """True when separate master weights are kept (fp32 masters of a 16-bit model); False when the
        optimizer steps the model's own parameters (fp32, or 16-bit masters)."""
        return self.master_dtype is not None and self.master_dtype != self.dtype

    @property
    def stepped_dtype(self) -> torch.dtype:
        """The dtype of the weights the optimizer updates."""
        return self.master_dtype if self.master_dtype is not None else self.dtype

    @property
    def low_precision(self) -> bool:
        """True when any training state is kept below fp32: the optimizer is then driven through
        :class:`~ds_core.engine.low_precision.LowPrecisionStepper`."""
        return any(
            d != torch.float32 for d in (self.stepped_dtype, self.grad_dtype, self.state_dtype))

    @property
    def grads_are_views(self) -> bool:
        """True when the model's ``.grad`` can be views of the accumulation buffer (same dtype)."""
        return self.grad_dtype == self.dtype and not self.has_masters


def _low_keys(spec: Precision, config) -> str:
    keys = [k for k, on in (
        ("bf16.bf16_master_weights_and_grads", getattr(config.bf16, "bf16_master_weights_and_grads", False)),
        ("bf16.bf16_optimizer_states", getattr(config.bf16, "bf16_optimizer_states", False)),
        ("fp16.fp16_master_weights_and_grads", getattr(config.fp16, "fp16_master_weights_and_grads", False)),
        ("data_types.grad_accum_dtype", spec.grad_dtype != torch.float32)) if on]
    return ", ".join(keys)


def _check_supported(spec: Precision, config) -> None:
    """Low-precision state is implemented by stage 0 and ZeRO stages 1 and 2 (with or without CPU
    offload); anything else is refused naming the keys and the fix."""
    keys = _low_keys(spec, config)
    zero = config.section("zero_optimization") if hasattr(config, "section") else None
    stage = getattr(zero, "stage", 0) or 0
    if stage == 3:
        raise ConfigError(f"{keys} (low-precision training state) is supported at ZeRO stages 0, 1 and 2, and "
                          f"this config sets zero_optimization.stage 3; use stage 2 (gradients and optimizer "
                          f"state partitioned) or drop {keys}")
    device = getattr(getattr(zero, "offload_optimizer", None), "device", None)
    if device == "nvme":
        raise ConfigError(f"{keys} (low-precision training state) cannot be swapped to NVMe "
                          f"(zero_optimization.offload_optimizer.device nvme); use device cpu or none, or drop "
                          f"{keys}")
    opt = getattr(getattr(config, "optimizer", None), "type", "") or ""
    if opt.lower() in ("onebitadam", "zerooneadam", "onebitlamb"):
        raise ConfigError(f"{keys} (low-precision training state) does not combine with optimizer.type {opt!r}, "
                          f"whose error-feedback buffers need fp32 masters; drop {keys} or use Adam")


class FlatGradients:
    """One buffer holding the gradient of every trainable parameter, in a fixed order (fp32, or the
    precision's ``grad_dtype``).

    Parameters are laid out in reverse registration order, which is roughly the order backward
    produces their gradients, so buckets of consecutive slices become ready one after another.
    Tagged parameters (see ``ds_core.params``) follow in segments of their own reduce axis.
    """

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        # Parameters tagged with another reduce axis (experts) form their own contiguous segment.
        self.params = sorted(reversed(params), key=lambda p: reduce_axis(p) != DEFAULT_AXIS)
        self.offsets: list[int] = []
        self.segments: list[tuple[str, str | None, int, int]] = []  # (reduce axis, shard axis, start, end)
        total = 0
        for p in self.params:
            key = (reduce_axis(p), shard_axis(p))
            if not self.segments or self.segments[-1][:2] != key:
                self.segments.append((*key, total, total))
            self.offsets.append(total)
            total += p.numel()
            self.segments[-1] = (*key, self.segments[-1][2], total)
        self.numel = total
        self.buffer = torch.zeros(total, dtype=dtype, device=device)
        self.views = [self.buffer[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, self.params)]
        self.index = {id(p): i for i, p in enumerate(self.params)}

    def view_of(self, p: torch.Tensor) -> torch.Tensor:
        return self.views[self.index[id(p)]]

    def zero(self) -> None:
        self.buffer.zero_()


class LossScaler:
    """Static or dynamic loss scale with DeepSpeed's semantics.

    Dynamic: start at 2**initial_scale_power; an overflow spends one unit of hysteresis, and once
    hysteresis is spent halves the scale (never below min_loss_scale); loss_scale_window steps
    without overflow double it.
    """

    def __init__(self, static_scale: float = 0.0, initial_scale_power: int = 16,
                 loss_scale_window: int = 1000, hysteresis: int = 2, min_loss_scale: float = 1.0,
                 consecutive_hysteresis: bool = False) -> None:
        if static_scale < 0:
            raise ConfigError(f"fp16.loss_scale {static_scale} must be >= 0 (0 = dynamic)")
        self.dynamic = static_scale == 0
        self.scale = float(static_scale) if static_scale else float(2 ** initial_scale_power)
        self.window = loss_scale_window
        self.hysteresis = hysteresis
        self.remaining_hysteresis = hysteresis
        self.min_scale = min_loss_scale
        self.consecutive = consecutive_hysteresis
        self.iteration = 0
        self.last_overflow = -1

    @classmethod
    def from_config(cls, fp16) -> LossScaler:
        return cls(fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window,
                   fp16.hysteresis, fp16.min_loss_scale, fp16.consecutive_hysteresis)

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            if self.remaining_hysteresis <= 1:
                self.scale = max(self.scale / 2, self.min_scale)
            else:
                self.remaining_hysteresis -= 1
            self.last_overflow = self.iteration
        else:
            if self.consecutive:
                self.remaining_hysteresis = self.hysteresis
            if (self.iteration - self.last_overflow) % self.window == 0:
                if not self.consecutive:
                    self.remaining_hysteresis = self.hysteresis
                self.scale *= 2
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"scale": self.scale, "remaining_hysteresis": self.remaining_hysteresis,
                "iteration": self.iteration, "last_overflow": self.last_overflow}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.remaining_hysteresis = int(state["remaining_hysteresis"])
        self.iteration = int(state["iteration"])
        self.last_overflow = int(state["last_overflow"])
