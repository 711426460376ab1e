"""What the engine does with the data-efficiency config at each training forward.

:func:`build_data_efficiency` returns ``None`` when nothing is enabled, else a :class:`DataEfficiency`
whose ``before_forward(global_steps, inputs, kwargs)`` the engine calls before running the module in
training mode:

- **curriculum** (``curriculum_learning`` or ``data_efficiency.data_sampling.curriculum_learning``):
  the difficulty d is updated to ``schedule(global_steps + 1)`` while it is below the maximum (as
  DeepSpeed does). A model whose ``forward`` takes ``curriculum_seqlen`` receives ``curriculum_seqlen=d``
  (DeepSpeed's contract: the model truncates); any other model gets its batch truncated by the engine:
  every tensor argument of 2 or more dimensions whose dimension 1 has the sequence length of the first
  one (tokens, targets, position ids, a (batch, seq) mask) is cut to ``[:, :d]``. The first training
  forward checks ``max_difficulty`` against the shortest sequence length of every data-parallel rank
  (one all-reduce), so all ranks raise together.
- **progressive layer drop**: θ(global_steps) goes to a model whose ``forward`` takes ``pld_theta`` as
  ``progressive_layer_drop=True, pld_theta=θ`` (DeepSpeed's contract); other models get
  :class:`~ds_core.data_efficiency.layers.LayerDrop` installed on their block stack.
- **random-LTD**: the kept-token count ``schedule(global_steps)`` goes to the
  :class:`~ds_core.data_efficiency.layers.RandomLTD` installed on the listed blocks.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .. import comm
from ..errors import ConfigError
from .layers import LayerDrop, RandomLTD, find_blocks
from .schedules import DifficultySchedule, pld_theta

__all__ = ["DataEfficiency", "build_data_efficiency"]


def _forward_params(module: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def build_data_efficiency(config, module: torch.nn.Module, group=None) -> DataEfficiency | None:
    """The run's data efficiency from the parsed config, or ``None`` when it uses none."""
    legacy = config.curriculum_learning
    newer = config.data_efficiency
    schedule, where = None, None
    newer_schedule = newer.curriculum_schedule()
    if legacy.enabled and newer_schedule is not None:
        raise ConfigError("curriculum_learning and data_efficiency.data_sampling.curriculum_learning are both "
                          "enabled; they are two spellings of one curriculum: keep one")
    if legacy.enabled:
        schedule, where = legacy.schedule(), "curriculum_learning.max_difficulty"
    elif newer_schedule is not None:
        schedule = newer_schedule
        where = f"{newer_schedule.where}.max_difficulty"
    pld = config.progressive_layer_drop if config.progressive_layer_drop.enabled else None
    ltd = newer.random_ltd()
    if schedule is None and pld is None and ltd is None:
        return None
    return DataEfficiency(module, schedule, where, pld, ltd, newer.random_ltd_schedule(), newer.seed,
                          config.seed or 0, group, legacy=legacy.enabled)


class DataEfficiency:
    """The engine's data-efficiency state (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, curriculum: DifficultySchedule | None, where: str | None,
                 pld, ltd, ltd_schedule: DifficultySchedule | None, ltd_seed: int, seed: int, group=None,
                 legacy: bool = False) -> None:
        params = _forward_params(module)
        self.group = group
        self.legacy = legacy
        self.curriculum = curriculum
        self._where = where
        self.current_difficulty = curriculum.min_value if curriculum is not None else None
        self.passes_seqlen = "curriculum_seqlen" in params
        self._checked = curriculum is None
        self.pld = pld
        self.pld_passed = "pld_theta" in params
        self.layer_drop = None
        if pld is not None and not self.pld_passed:
            self.layer_drop = LayerDrop(find_blocks(module)[1], seed)
        self.theta = 1.0 if pld is not None else None
        self.ltd_schedule = ltd_schedule
        self.random_ltd = None
        self.kept_tokens: int | None = None
        if ltd is not None:
            name, blocks = find_blocks(module)
            if ltd.total_layer_num is not None and ltd.total_layer_num != len(blocks):
                raise ConfigError(f"data_efficiency.data_routing.random_ltd.total_layer_num {ltd.total_layer_num} "
                                  f"!= the {len(blocks)} blocks of the model ({name}); set it to {len(blocks)}")
            self.random_ltd = RandomLTD(blocks, ltd.random_ltd_layer_id, ltd_seed,
                                        seq_dim=1 if ltd.hidden_state_order == "batch_seq_dim" else 0,
                                        mask_name=ltd.model_mask_name)

    # -- schedules -------------------------------------------------------------------------------------
    def update(self, global_steps: int) -> None:
        """Advance every schedule to the forward of optimizer step ``global_steps`` (0-based)."""
        if self.curriculum is not None and self.current_difficulty < self.curriculum.max_value:
            self.current_difficulty = self.curriculum.value(global_steps + 1)
        if self.pld is not None:
            self.theta = pld_theta(global_steps, self.pld.theta, self.pld.gamma)
        if self.ltd_schedule is not None:
            self.kept_tokens = self.ltd_schedule.value(global_steps)

    # -- the forward ---------------------------------------------------------------------------------------
    def before_forward(self, global_steps: int, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.update(global_steps)
        if self.curriculum is not None:
            inputs, kwargs = self._curriculum(inputs, kwargs)
        if self.pld is not None:
            if self.pld_passed:
                kwargs = {**kwargs, "progressive_layer_drop": True, "pld_theta": self.theta}
            else:
                self.layer_drop.begin_forward(self.theta)
        if self.random_ltd is not None:
            self.random_ltd.begin_forward(self.kept_tokens)
        return inputs, kwargs

    def _curriculum(self, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ref = inputs[0] if inputs else kwargs.get("input_ids")
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            raise ConfigError(f"{self._where.rsplit('.', 1)[0]} is enabled but the first input is not a (batch, "
                              f"sequence) tensor, so there is no sequence length to schedule; pass the tokens "
                              f"first (or as input_ids=)")
        length = ref.shape[1]
        if not self._checked:
            self._check_length(length)
        d = self.current_difficulty
        if self.passes_seqlen:
            return inputs, {**kwargs, "curriculum_seqlen": d}
        if d >= length:
            return inputs, kwargs
        return _truncate(inputs, length, d), _truncate(kwargs, length, d)

    def _check_length(self, length: int) -> None:
        # [Note: every rank raises] the shortest length over the data ranks decides, so a rank whose
        # data is long enough raises too instead of waiting in the next collective.
        shortest = torch.tensor([length], dtype=torch.int64)
        if self.group is not None:  # None: a one-process world
            comm.all_reduce(shortest, op=comm.ReduceOp.MIN, group=self.group)
        shortest = int(shortest.item())
        self._checked = True
        if self.curriculum.max_value > shortest:
            raise ConfigError(f"{self._where} {self.curriculum.max_value} exceeds the data's sequence length "
                              f"{shortest} (the shortest over the data-parallel ranks): the curriculum cannot "
                              f"grow past the data; set it to at most {shortest}")

    # -- what the engine reports ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"curriculum_seqlen": self.current_difficulty, "pld_theta": self.theta,
                "random_ltd_kept_tokens": self.kept_tokens}


def _truncate(value: Any, length: int, d: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:, :d] if value.dim() >= 2 and value.shape[1] == length else value
    if isinstance(value, tuple):
        return tuple(_truncate(v, length, d) for v in value)
    if isinstance(value, list):
        return [_truncate(v, length, d) for v in value]
    if isinstance(value, dict):
        return {k: _truncate(v, length, d) for k, v in value.items()}
    return value
