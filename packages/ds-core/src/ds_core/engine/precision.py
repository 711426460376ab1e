"""Precision: fp32, bf16 and fp16 training around flat fp32 gradient (and master-weight) buffers.

- fp32: the optimizer steps the model's own parameters; their ``.grad`` are views into one flat fp32
  buffer, so the gradient reducer all-reduces contiguous buckets with no copies.
- bf16 / fp16: the model holds 16-bit parameters; a flat fp32 copy (the master weights) is what the
  optimizer steps, gradients are accumulated in fp32 across micro-steps, and after each step the
  masters are copied back into the model (Micikevicius et al. 2018, "Mixed Precision Training").
- fp16 adds dynamic loss scaling with DeepSpeed's knobs and skips a step when any rank overflowed.
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

    ``master_dtype`` is ``None`` when the optimizer steps the model's own parameters (fp32);
    otherwise separate master weights of that dtype are kept (fp32 for bf16/fp16 today; a
    low-precision master choice would set it to the model's 16-bit dtype).
    """

    name: str
    dtype: torch.dtype
    master_dtype: torch.dtype | None
    loss_scaling: bool

    @classmethod
    def from_name(cls, name: str) -> Precision:
        dtype = DTYPES[name]
        return cls(name, dtype, None if dtype == torch.float32 else torch.float32, name == "fp16")

    @property
    def has_masters(self) -> bool:
        return self.master_dtype is not None


class FlatGradients:
    """One fp32 buffer holding the gradient of every trainable parameter, in a fixed order.

    Parameters are laid out in reverse registration order, which is roughly the order backward
    produces their gradients, so buckets of consecutive slices become ready one after another.
    Tagged parameters (see ``ds_core.params``) follow in segments of their own reduce axis.
    """

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device) -> None:
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
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
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
