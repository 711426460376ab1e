"""Step schedules of data efficiency: a value (a sequence length, a kept-token count, a keep probability)
as a function of the optimizer step.

- :class:`DifficultySchedule` — DeepSpeed's curriculum schedules (Li et al. 2022, "The Stability-
  Efficiency Dilemma", arXiv:2108.06084), also used by random-LTD for its kept-token count:

  ``fixed_root``:     d(t) = floor(min + (max - min) · (t / T) ** (1 / root_degree)), rounded down to a
  multiple of ``difficulty_step`` and capped at ``max``;
  ``fixed_linear``:   ``fixed_root`` with ``root_degree`` 1;
  ``fixed_discrete``: ``difficulty[i]`` for the first i with t <= ``max_step[i]``, the last difficulty
  after the last ``max_step``.

- :func:`pld_theta` — progressive layer drop's keep probability (Zhang & He 2020, "Accelerating
  Training of Transformer-Based Language Models with Progressive Layer Dropping", eq. 4):
  θ(t) = (1 − θ̄) · exp(−γ · t) + θ̄.

Every rule a schedule needs is checked when it is built, so a bad config fails at ``parse_config`` on
every rank, before any process group or step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["DifficultySchedule", "SCHEDULE_TYPES", "pld_theta"]

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete")


def _whole(where: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}.{key} {value!r} must be a whole number >= {minimum}")
    return value


class DifficultySchedule:
    """``value(step)`` of a DeepSpeed curriculum schedule (see the module docstring).

    ``names`` maps DeepSpeed's key names for this use: the curriculum says ``total_curriculum_step`` and
    ``difficulty_step``, random-LTD ``require_steps`` and ``seq_per_step``.
    """

    def __init__(self, where: str, min_value: Any, max_value: Any, schedule_type: Any,
                 schedule_config: Mapping[str, Any], *, total_key: str = "total_curriculum_step",
                 step_key: str = "difficulty_step", min_key: str = "min_difficulty",
                 max_key: str = "max_difficulty", types: tuple[str, ...] = SCHEDULE_TYPES) -> None:
        self.where = where
        if schedule_type not in types:
            raise ConfigError(f"{where}.schedule_type {schedule_type!r} is not a schedule ds knows; use one of "
                              f"{', '.join(map(repr, types))}")
        self.schedule_type = schedule_type
        config = dict(schedule_config or {})
        self.config = config
        if schedule_type == "fixed_discrete":
            self._discrete(config)
            self.min_value = min(self.difficulty)
            self.max_value = max(self.difficulty)
            return
        self.min_value = _whole(where, min_key, min_value, 1)
        self.max_value = _whole(where, max_key, max_value, 1)
        if self.max_value < self.min_value:
            raise ConfigError(f"{where}: {max_key} {self.max_value} < {min_key} {self.min_value}; the schedule "
                              f"grows from {min_key} to {max_key}: swap them")
        allowed = {total_key, step_key} | ({"root_degree"} if schedule_type == "fixed_root" else set())
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ConfigError(f"{where}.schedule_config has {unknown}, which {schedule_type} does not read; its "
                              f"keys are {sorted(allowed)}")
        for key in sorted(allowed):
            if key not in config:
                raise ConfigError(f"{where}.schedule_config needs {key!r} for schedule_type {schedule_type!r}")
        self.total = _whole(f"{where}.schedule_config", total_key, config[total_key], 1)
        self.step = _whole(f"{where}.schedule_config", step_key, config[step_key], 1)
        self.root_degree = (_whole(f"{where}.schedule_config", "root_degree", config["root_degree"], 1)
                            if schedule_type == "fixed_root" else 1)
        # [Note: grid] every value is rounded down to a multiple of the step, so a minimum off the grid
        # would start below itself (min 5 with step 8 starts at 0 tokens). The maximum may be off the grid
        # (ViT's 197 tokens): the value is capped at it, and reaches it once t passes the total steps.
        if self.min_value % self.step:
            raise ConfigError(f"{where}.schedule_config.{step_key} {self.step} does not divide {min_key} "
                              f"{self.min_value}: every value is rounded down to a multiple of {step_key}, so the "
                              f"schedule would start below {min_key}; make {min_key} a multiple of {self.step} or "
                              f"pick a {step_key} that divides {self.min_value}")

    def _discrete(self, config: Mapping[str, Any]) -> None:
        where = f"{self.where}.schedule_config"
        unknown = sorted(set(config) - {"difficulty", "max_step"})
        if unknown:
            raise ConfigError(f"{where} has {unknown}, which fixed_discrete does not read; its keys are "
                              f"['difficulty', 'max_step']")
        difficulty, max_step = config.get("difficulty"), config.get("max_step")
        if not isinstance(difficulty, list) or not isinstance(max_step, list) or not difficulty:
            raise ConfigError(f"{where} needs lists 'difficulty' and 'max_step' for fixed_discrete")
        if len(difficulty) != len(max_step) + 1:
            raise ConfigError(f"{where}: fixed_discrete needs one more difficulty than max_step (the last "
                              f"difficulty holds after the last max_step): got {len(difficulty)} difficulties "
                              f"and {len(max_step)} max_steps")
        self.difficulty = [_whole(where, "difficulty", d, 1) for d in difficulty]
        self.max_step = [_whole(where, "max_step", s, 0) for s in max_step]
        if any(b <= a for a, b in zip(self.max_step, self.max_step[1:])):
            raise ConfigError(f"{where}.max_step {self.max_step} must increase")

    def value(self, step: int) -> int:
        """The scheduled value at optimizer step ``step``."""
        if self.schedule_type == "fixed_discrete":
            for limit, difficulty in zip(self.max_step, self.difficulty):
                if step <= limit:
                    return difficulty
            return self.difficulty[-1]
        fraction = (float(step) / self.total) ** (1.0 / self.root_degree)
        value = math.floor(fraction * (self.max_value - self.min_value) + self.min_value)
        value -= value % self.step
        return min(value, self.max_value)


def pld_theta(step: int, theta: float, gamma: float) -> float:
    """Progressive layer drop's keep probability at step ``step``: (1 − θ̄)·exp(−γ·t) + θ̄."""
    return (1.0 - theta) * math.exp(-gamma * step) + theta
