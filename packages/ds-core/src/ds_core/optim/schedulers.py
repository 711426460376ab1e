"""DeepSpeed's learning-rate schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest).

Parameter names, defaults and the step convention are DeepSpeed's, so a DeepSpeed ``scheduler``
section gives the same learning rate at every step:

- ``last_batch_iteration`` counts optimizer steps taken, starting at -1. Constructing a schedule sets
  the lr for the first step (the schedule's value at -1); the engine calls ``step()`` after every
  optimizer step, which advances the counter and sets the lr for the next one.
- ``state_dict()`` is ``{"last_batch_iteration": int, "base_lrs": [float, ...]}`` — plain JSON — and
  ``load_state_dict`` also accepts DeepSpeed's own ``{"last_batch_iteration": n}``.

Each schedule is a ``torch.optim.lr_scheduler.LRScheduler`` (``get_lr``, ``get_last_lr``, ``step``,
``last_epoch``) whose lr at an iteration is a closed-form function of it; :func:`build_scheduler`
reads a :class:`~ds_core.config.SchedulerConfig`, where ``"auto"`` means the default.
Where we differ from DeepSpeed (each noted at its class): WarmupCosineLR holds its floor after
``total_num_steps`` instead of rising again; OneCycle applies its stair counts, starts momentum at
``cycle_max_mom`` (the value its own formula gives at the first step), keeps each group's beta2 and
also cycles SGD's ``momentum``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..config.optim import SCHEDULER_PARAMS, SCHEDULERS, WARMUP_TYPES, check_scheduler
from ..config.sections import SchedulerConfig
from ..config.values import finite_number
from ..errors import ConfigError, closest

__all__ = [
    "build_scheduler",
    "scheduler_params",
    "DeepSpeedSchedule",
    "WarmupLR",
    "WarmupDecayLR",
    "WarmupCosineLR",
    "OneCycle",
    "LRRangeTest",
    "WARMUP_TYPES",
]



def _optimizer_of(optimizer: Any) -> Any:
    """The object whose ``param_groups`` we drive: the optimizer, or what a wrapper holds."""
    if hasattr(optimizer, "param_groups"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "param_groups"):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not an optimizer (it has no param_groups)")


def _set_group_value(group: dict[str, Any], key: str, value: float) -> None:
    # A tensor lr (capturable/fused optimizers) must stay the same tensor.
    if isinstance(group.get(key), torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


class DeepSpeedSchedule(LRScheduler):
    """Base of the schedules here: subclasses implement ``lr_at(iteration) -> list[float]``.

    ``base_lrs`` are the groups' ``initial_lr`` (set from their ``lr`` on first use, as torch does).
    """

    def __init__(self, optimizer: Any, last_batch_iteration: int = -1) -> None:
        # LRScheduler.__init__ is not called: it would take a step, which DeepSpeed's convention
        # does not; everything the base class methods read is set here.
        self.optimizer = _optimizer_of(optimizer)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
        self.base_lrs = [float(group["initial_lr"]) for group in self.optimizer.param_groups]
        self.last_batch_iteration = _integer(type(self).__name__, "last_batch_iteration", last_batch_iteration, -1)
        self._step_count = 0
        self._last_lr: list[float] = []

    # torch names the counter last_epoch; both names read and write the same value.
    @property
    def last_epoch(self) -> int:
        return self.last_batch_iteration

    @last_epoch.setter
    def last_epoch(self, value: int) -> None:
        self.last_batch_iteration = value

    def lr_at(self, iteration: int) -> list[float]:
        """The learning rate of each param group after ``iteration + 1`` optimizer steps."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        """The learning rate of each param group at the current ``last_batch_iteration``."""
        return self.lr_at(self.last_batch_iteration)

    def step(self, last_batch_iteration: int | None = None) -> None:  # type: ignore[override]
        """Advance one optimizer step (or jump to ``last_batch_iteration``) and set the new lr."""
        self._step_count += 1
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None \
            else int(last_batch_iteration)
        self._apply()

    def _apply(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            _set_group_value(group, "lr", lr)
        self._last_lr = [float(lr) for lr in lrs]

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": int(self.last_batch_iteration), "base_lrs": [float(x) for x in self.base_lrs]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "last_batch_iteration" not in state_dict:
            raise ConfigError(f"{type(self).__name__}.load_state_dict: the state has no 'last_batch_iteration' "
                              f"(keys: {sorted(state_dict)}); pass what state_dict() returned")
        self.last_batch_iteration = int(state_dict["last_batch_iteration"])
        if "base_lrs" in state_dict:
            base_lrs = [float(x) for x in state_dict["base_lrs"]]
            if len(base_lrs) != len(self.optimizer.param_groups):
                raise ConfigError(f"{type(self).__name__}.load_state_dict: the state has {len(base_lrs)} base lrs "
                                  f"but the optimizer has {len(self.optimizer.param_groups)} param groups; load it "
                                  "into an optimizer built with the same groups")
            self.base_lrs = base_lrs
        self._apply()

    def _per_group(self, key: str, value: Any) -> list[float]:
        """A number for every param group: one number for all, or a list with one per group."""
        groups = len(self.optimizer.param_groups)
        if isinstance(value, (list, tuple)):
            if len(value) != groups:
                raise ConfigError(f"{type(self).__name__}: {key} has {len(value)} values but the optimizer has "
                                  f"{groups} param groups; give one number, or one per group")
            return [_number(type(self).__name__, key, v) for v in value]
        return [_number(type(self).__name__, key, value)] * groups


def _number(owner: str, key: str, value: Any) -> float:
    return finite_number(f"scheduler {owner}", key, value)


def _integer(owner: str, key: str, value: Any, minimum: int) -> int:
    number = _number(owner, key, value)
    if not number.is_integer() or number < minimum:
        raise ConfigError(f"scheduler {owner}: {key} {value!r} must be a whole number >= {minimum}")
    return int(number)


def _flag(owner: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"scheduler {owner}: {key} {value!r} must be true or false")
    return value


def _warmup_type(owner: str, value: Any) -> str:
    if value not in WARMUP_TYPES:
        raise ConfigError(f"scheduler {owner}: warmup_type {value!r} is not one of {', '.join(WARMUP_TYPES)}; "
                          f"use 'log' (DeepSpeed's default) or 'linear'")
    return value


def _warmup_fraction(iteration: int, steps: int, kind: str) -> float:
    """DeepSpeed's warmup curve, 0 at iteration 0 and 1 once iteration reaches ``steps``.

    log: ln(i + 1) / ln(steps), reaching 1 at i = steps - 1; linear: i / steps.
    """
    if iteration >= steps:
        return 1.0
    if kind == "log":
        return math.log(iteration + 1) / math.log(steps)
    return iteration / steps


class WarmupLR(DeepSpeedSchedule):
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold.

    ``lr(i) = min + (max - min) * w(i)`` with ``w`` the log or linear warmup curve
    (``w(i) = ln(i+1)/ln(N)`` or ``i/N``, 1 once ``i >= N``); before the first step (i = -1) the lr
    is ``min``. ``warmup_num_steps`` is raised to at least 2 (as DeepSpeed does; ln(1) = 0).
    ``warmup_max_lr`` defaults to each group's own lr (newer DeepSpeed's behaviour; older releases
    used 0.001). Both bounds may be lists with one value per param group.
    """

    def __init__(
        self,
        optimizer: Any,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        owner = type(self).__name__
        self.min_lrs = self._per_group("warmup_min_lr", warmup_min_lr)
        self.max_lrs = list(self.base_lrs) if warmup_max_lr is None else self._per_group("warmup_max_lr", warmup_max_lr)
        self.warmup_num_steps = max(2, _integer(owner, "warmup_num_steps", warmup_num_steps, 0))
        self.warmup_type = _warmup_type(owner, warmup_type)
        self._apply()

    def _gamma(self, iteration: int) -> float:
        return _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)

    def lr_at(self, iteration: int) -> list[float]:
        if iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma(iteration)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then a linear decay that reaches ``warmup_min_lr`` at ``total_num_steps``.

    After warmup ``lr(i) = min + (max - min) * max(0, (T - i) / max(1, T - N))`` with ``T`` =
    ``total_num_steps`` and ``N`` = ``warmup_num_steps``; the lr is ``min`` from ``i = T`` on.
    """

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = _integer(type(self).__name__, "total_num_steps", total_num_steps, 1)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            warnings.warn(f"WarmupDecayLR: total_num_steps {self.total_num_steps} < warmup_num_steps "
                          f"{self.warmup_num_steps}: the lr drops to warmup_min_lr right after warmup",
                          UserWarning, stacklevel=2)

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
        remaining = (self.total_num_steps - iteration) / max(1.0, self.total_num_steps - self.warmup_num_steps)
        return max(0.0, remaining)


class WarmupCosineLR(DeepSpeedSchedule):
    """Warm up a ratio of each group's base lr, then follow a cosine down to ``cos_min_ratio``.

    With ``N`` = ``warmup_num_steps`` and ``T`` = ``total_num_steps``, the lr is ``base_lr * r(i)``::

        i < N:  r = warmup_min_ratio + (1 - warmup_min_ratio) * w(i)     (w: the log/linear curve)
        i >= N: r = cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2,
                p = min(1, (i - N + 1) / max(1, T - N))

    so the floor ``cos_min_ratio * base_lr`` is reached at ``i = T - 1``. DeepSpeed lets ``p`` pass 1,
    which makes the lr climb again after ``T``; we hold the floor. Before the first step (i = -1) the
    ratio is ``warmup_min_ratio`` (DeepSpeed: 0, the same for the default ratio of 0).
    """

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        owner = type(self).__name__
        self.total_num_steps = _integer(owner, "total_num_steps", total_num_steps, 1)
        self.warmup_min_ratio = _number(owner, "warmup_min_ratio", warmup_min_ratio)
        self.cos_min_ratio = _number(owner, "cos_min_ratio", cos_min_ratio)
        for key, ratio in (("warmup_min_ratio", self.warmup_min_ratio), ("cos_min_ratio", self.cos_min_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"scheduler {owner}: {key} {ratio} must lie in [0, 1] (a fraction of the "
                                  "optimizer's lr)")
        self.warmup_num_steps = max(2, _integer(owner, "warmup_num_steps", warmup_num_steps, 0))
        self.warmup_type = _warmup_type(owner, warmup_type)
        if self.total_num_steps < self.warmup_num_steps:
            warnings.warn(f"WarmupCosineLR: total_num_steps {self.total_num_steps} < warmup_num_steps "
                          f"{self.warmup_num_steps}: the lr drops to the cosine floor right after warmup",
                          UserWarning, stacklevel=2)
        self._apply()

    def ratio_at(self, iteration: int) -> float:
        """The fraction of the base lr used after ``iteration + 1`` steps."""
        if iteration < 0:
            return self.warmup_min_ratio
        if iteration < self.warmup_num_steps:
            w = _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * w
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, (iteration - self.warmup_num_steps + 1) / span)
        return self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def lr_at(self, iteration: int) -> list[float]:
        ratio = self.ratio_at(iteration)
        return [base * ratio for base in self.base_lrs]


class OneCycle(DeepSpeedSchedule):
    """Smith's 1cycle policy (arXiv:1803.09820) as DeepSpeed defines it, with optional stairs.

    The position in the cycle after ``i + 1`` steps is ``x = frac((i + 1) / C)`` with
    ``C = cycle_first_step_size + cycle_second_step_size`` and ``s1 = cycle_first_step_size / C``::

        x <= s1: h = x / s1                  (rises 0 -> 1 over the first phase)
        x >  s1: h = (1 - x) / (1 - s1)      (falls 1 -> 0 over the second phase)
        lr = cycle_min_lr + (cycle_max_lr - cycle_min_lr) * h
        momentum = cycle_max_mom - (cycle_max_mom - cycle_min_mom) * h

    With ``cycle_first_stair_count = k > 0`` the first phase's ``h`` is floored to multiples of
    ``1/k`` (k flat stairs); likewise the second phase with ``cycle_second_stair_count`` (which
    defaults to the first count). DeepSpeed documents the stair counts but does not apply them.

    From ``i >= C`` on (``d = i - C + 1`` steps into the decay), when ``decay_step_size > 0``::

        lr = cycle_min_lr / (1 + decay_lr_rate * d / decay_step_size)
        momentum = cycle_max_mom * (1 + decay_mom_rate * d / decay_step_size)

    and otherwise ``cycle_min_lr`` and ``cycle_max_mom``. Momentum is ``betas[0]`` for Adam-family
    optimizers (``betas[1]`` is kept; DeepSpeed resets it to 0.99) and ``momentum`` for SGD; with
    neither, momentum cycling is turned off with a warning. The first step uses ``cycle_min_lr`` and
    ``cycle_max_mom`` (DeepSpeed starts momentum at ``cycle_min_mom``, contradicting its formula).
    """

    def __init__(
        self,
        optimizer: Any,
        cycle_min_lr: float | Sequence[float],
        cycle_max_lr: float | Sequence[float],
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float = 0.8,
        cycle_max_mom: float = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        owner = type(self).__name__
        self.min_lrs = self._per_group("cycle_min_lr", cycle_min_lr)
        self.max_lrs = self._per_group("cycle_max_lr", cycle_max_lr)
        self.decay_lr_rate = _number(owner, "decay_lr_rate", decay_lr_rate)
        first = _integer(owner, "cycle_first_step_size", cycle_first_step_size, 1)
        second = first if cycle_second_step_size is None else \
            _integer(owner, "cycle_second_step_size", cycle_second_step_size, 0)
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = _integer(owner, "cycle_first_stair_count", cycle_first_stair_count, 0)
        self.second_stair_count = self.first_stair_count if cycle_second_stair_count is None else \
            _integer(owner, "cycle_second_stair_count", cycle_second_stair_count, 0)
        self.decay_step_size = _integer(owner, "decay_step_size", decay_step_size, 0)
        self.cycle_min_mom = _number(owner, "cycle_min_mom", cycle_min_mom)
        self.cycle_max_mom = _number(owner, "cycle_max_mom", cycle_max_mom)
        self.decay_mom_rate = _number(owner, "decay_mom_rate", decay_mom_rate)
        self.momentum_key = self._momentum_key() if _flag(owner, "cycle_momentum", cycle_momentum) else None
        self.cycle_momentum = self.momentum_key is not None
        self._apply()

    def _momentum_key(self) -> str | None:
        defaults = getattr(self.optimizer, "defaults", {})
        if "betas" in defaults:
            return "betas"
        if "momentum" in defaults:
            return "momentum"
        warnings.warn(f"OneCycle: cycle_momentum is turned off because {type(self.optimizer).__name__} has "
                      "neither betas nor momentum; set cycle_momentum false to silence this",
                      UserWarning, stacklevel=3)
        return None

    def height_at(self, iteration: int) -> float:
        """The cycle's height ``h`` in [0, 1] after ``iteration + 1`` steps (inside the cycle)."""
        position = (iteration + 1) / self.total_size
        x = position - math.floor(position)
        if x <= self.step_ratio:
            h = x / self.step_ratio
            if self.first_stair_count > 0:
                h = math.floor(h * self.first_stair_count) / self.first_stair_count
            return h
        h = (1.0 - x) / (1.0 - self.step_ratio)
        if self.second_stair_count > 0:
            # stairs measured from the top of the second phase, so it starts flat at 1
            h = 1.0 - math.floor((1.0 - h) * self.second_stair_count) / self.second_stair_count
        return h

    def _decay_interval(self, iteration: int) -> float:
        return (iteration - self.total_size + 1) / self.decay_step_size

    def lr_at(self, iteration: int) -> list[float]:
        if iteration < self.total_size:
            h = self.height_at(iteration)
            return [lo + (hi - lo) * h for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.decay_step_size == 0 or self.decay_lr_rate == 0:
            return list(self.min_lrs)
        factor = 1.0 + self.decay_lr_rate * self._decay_interval(iteration)
        return [lo / factor for lo in self.min_lrs]

    def momentum_at(self, iteration: int) -> float:
        """The momentum (beta1) after ``iteration + 1`` steps."""
        if iteration < self.total_size:
            return self.cycle_max_mom - (self.cycle_max_mom - self.cycle_min_mom) * self.height_at(iteration)
        if self.decay_step_size == 0 or self.decay_mom_rate == 0:
            return self.cycle_max_mom
        return self.cycle_max_mom * (1.0 + self.decay_mom_rate * self._decay_interval(iteration))

    def _apply(self) -> None:
        super()._apply()
        if self.momentum_key is None:
            return
        momentum = self.momentum_at(self.last_batch_iteration)
        for group in self.optimizer.param_groups:
            if self.momentum_key == "betas":
                group["betas"] = (momentum, group["betas"][1])
            else:
                _set_group_value(group, "momentum", momentum)


class LRRangeTest(DeepSpeedSchedule):
    """Grow the lr from ``lr_range_test_min_lr`` to find the largest that still trains (Smith 2018).

    ``lr(i) = min_lr * (1 + step_rate * n)`` with ``n = (i + 1) / step_size`` (continuous) or
    ``floor((i + 1) / step_size)`` when ``lr_range_test_staircase`` is true.
    """

    def __init__(
        self,
        optimizer: Any,
        lr_range_test_min_lr: float | Sequence[float] = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        owner = type(self).__name__
        self.min_lrs = self._per_group("lr_range_test_min_lr", lr_range_test_min_lr)
        self.step_size = _integer(owner, "lr_range_test_step_size", lr_range_test_step_size, 1)
        self.step_rate = _number(owner, "lr_range_test_step_rate", lr_range_test_step_rate)
        self.staircase = _flag(owner, "lr_range_test_staircase", lr_range_test_staircase)
        self._apply()

    def lr_at(self, iteration: int) -> list[float]:
        intervals = (iteration + 1) / self.step_size
        if self.staircase:
            intervals = math.floor(intervals)
        return [lo * (1.0 + self.step_rate * intervals) for lo in self.min_lrs]


_CLASSES: dict[str, type[DeepSpeedSchedule]] = {
    "WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle, "LRRangeTest": LRRangeTest,
}


def scheduler_params(name: str) -> dict[str, Any]:
    """Accepted params of scheduler ``name`` and their defaults (``inspect.Parameter.empty``: required)."""
    return {key: default for key, (_, default) in SCHEDULER_PARAMS[_canonical_name(name)].items()}


def _canonical_name(type_name: str) -> str:
    by_lower = {name.lower(): name for name in _CLASSES}
    name = str(type_name).strip()
    if name.lower() not in by_lower:
        raise ConfigError(f"scheduler type {type_name!r} is not supported{closest(name, _CLASSES)}; "
                          f"use one of {', '.join(SCHEDULERS)}")
    return by_lower[name.lower()]


def build_scheduler(
    config: SchedulerConfig, optimizer: Any, *, auto: Mapping[str, Any] | None = None
) -> DeepSpeedSchedule:
    """The schedule ``config`` names, driving ``optimizer``'s param groups.

    A param set to ``"auto"`` takes the value in ``auto`` when the caller knows it (a trainer passes
    e.g. ``{"total_num_steps": 10_000}``), else the schedule's default. Unknown params, and required
    ones that are missing or left to an unresolved ``"auto"``, raise :class:`ConfigError`.
    """
    name = _canonical_name(config.type)
    kwargs = check_scheduler(name, config.params, auto)  # the schema in ds_core.config.optim
    return _CLASSES[name](optimizer, **kwargs)
