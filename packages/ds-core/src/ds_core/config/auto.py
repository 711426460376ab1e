"""``"auto"`` values filled from a trainer's settings, the way the Hugging Face Trainer does.

Hugging Face configs write ``"auto"`` for what the Trainer already knows (batch size, learning
rate, precision, ...). :func:`resolve_auto` takes those Trainer-side values and returns the config
with every ``"auto"`` it can fill replaced — and, like the Trainer, refuses a config whose explicit
values disagree with the Trainer's (set them to ``"auto"`` or make them equal).

=========================================================  =========================================
config key                                                 value
=========================================================  =========================================
``train_micro_batch_size_per_gpu``                         ``per_device_train_batch_size``
``gradient_accumulation_steps``                            ``gradient_accumulation_steps``
``train_batch_size``                                       ``world_size × per_device × accumulation``
``gradient_clipping``                                      ``max_grad_norm``
``optimizer.params.lr`` / ``betas`` / ``eps`` /            ``learning_rate`` / ``[adam_beta1,
``weight_decay``                                           adam_beta2]`` / ``adam_epsilon`` /
                                                           ``weight_decay``
``scheduler.params.warmup_min_lr``                         ``0``
``scheduler.params.warmup_max_lr``                         ``learning_rate``
``scheduler.params.warmup_num_steps``                      ``max(1, warmup_steps)``
``scheduler.params.total_num_steps``                       ``num_training_steps``
``fp16.enabled`` / ``bf16.enabled``                        ``fp16`` / ``bf16``
``zero_optimization.reduce_bucket_size``                   ``hidden_size²``
``zero_optimization.stage3_prefetch_bucket_size``          ``int(0.9 × hidden_size²)`` (stage 3)
``zero_optimization.stage3_param_persistence_threshold``   ``10 × hidden_size`` (stage 3)
=========================================================  =========================================

A batch key that is absent is filled too (Accelerate does so when the Trainer prepares the engine).
A Trainer value passed as ``None`` is unknown: its ``"auto"`` stays, and :func:`parse_config` then
uses DeepSpeed's default — or, where a number is needed (a batch size with nothing to solve it from,
a schedule's ``total_num_steps``), fails naming the key and this function.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import ConfigError
from .loader import read_config

__all__ = ["resolve_auto"]


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


class _Filler:
    def __init__(self, config: dict[str, Any], check: bool) -> None:
        self.config = config
        self.check = check
        self.mismatches: list[str] = []

    def node(self, path: str) -> tuple[dict[str, Any] | None, str]:
        """(the dict holding the last key of ``path``, that key); None when a section is absent."""
        *parents, key = path.split(".")
        node: Any = self.config
        for part in parents:
            if part == "bf16" and "bf16" not in node and "bfloat16" in node:
                part = "bfloat16"
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                return None, key
        return node, key

    def fill(self, path: str, value: Any, source: str, *, match: bool = True, absent: bool = False) -> None:
        """Replace an "auto" at ``path`` by ``value``; compare an explicit value when ``match``;
        write ``value`` where the key is missing when ``absent``."""
        if value is None:
            return
        node, key = self.node(path)
        if node is None:
            return
        if key not in node:
            if absent:
                node[key] = value
            return
        current = node[key]
        if _is_auto(current):
            node[key] = value
        elif match and self.check and current is not None and not _same(current, value):
            self.mismatches.append(f"{path}={current!r} vs the trainer's {source}={value!r}")


def resolve_auto(
    config: Any,
    *,
    per_device_train_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    world_size: int | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    adam_beta1: float | None = None,
    adam_beta2: float | None = None,
    adam_epsilon: float | None = None,
    max_grad_norm: float | None = None,
    warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    hidden_size: int | None = None,
    fp16: bool | None = None,
    bf16: bool | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """``config`` (dict, JSON string or path) with its ``"auto"`` values filled from a trainer's.

    The arguments are the Hugging Face ``TrainingArguments`` of the same names (``world_size`` is
    the number of data-parallel ranks; ``num_training_steps`` and ``warmup_steps`` the optimizer
    steps the run takes and warms up for; ``hidden_size`` the model's). Returns a new dict; the
    input is not modified. With ``check`` (the Trainer's behaviour), explicit config values that
    differ from the trainer's raise one :class:`ConfigError` listing every disagreement.
    """
    raw, _ = read_config(config)
    raw = copy.deepcopy(raw)
    f = _Filler(raw, check)

    micro, accumulation = per_device_train_batch_size, gradient_accumulation_steps
    # A config that leaves the whole batch to the trainer (every batch key absent or "auto") gets all
    # three from it, as Accelerate does; one that sets some keeps them and has only its "auto"s filled.
    batch_keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    trainer_batch = (micro is not None and accumulation is not None and world_size is not None
                     and all(k not in raw or _is_auto(raw[k]) for k in batch_keys))
    f.fill("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size", absent=trainer_batch)
    f.fill("gradient_accumulation_steps", accumulation, "gradient_accumulation_steps", absent=trainer_batch)
    if micro is not None and accumulation is not None and world_size is not None:
        f.fill("train_batch_size", world_size * micro * accumulation,
               "world_size × per_device_train_batch_size × gradient_accumulation_steps", absent=trainer_batch)
    f.fill("gradient_clipping", max_grad_norm, "max_grad_norm")

    f.fill("optimizer.params.lr", learning_rate, "learning_rate")
    if adam_beta1 is not None and adam_beta2 is not None:
        f.fill("optimizer.params.betas", [adam_beta1, adam_beta2], "[adam_beta1, adam_beta2]")
    f.fill("optimizer.params.eps", adam_epsilon, "adam_epsilon")
    f.fill("optimizer.params.weight_decay", weight_decay, "weight_decay")

    f.fill("scheduler.params.warmup_min_lr", 0, "", match=False)
    f.fill("scheduler.params.warmup_max_lr", learning_rate, "learning_rate")
    f.fill("scheduler.params.warmup_num_steps", None if warmup_steps is None else max(1, warmup_steps),
           "warmup_steps")
    f.fill("scheduler.params.total_num_steps", num_training_steps, "num_training_steps")

    f.fill("fp16.enabled", fp16, "fp16")
    f.fill("bf16.enabled", bf16, "bf16")

    if hidden_size is not None:
        f.fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size, "", match=False)
        zero = raw.get("zero_optimization")
        if isinstance(zero, dict) and zero.get("stage") == 3:
            f.fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), "",
                   match=False)
            f.fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, "", match=False)

    if f.mismatches:
        raise ConfigError("config values disagree with the trainer's: " + "; ".join(f.mismatches)
                          + ". Set these config values to \"auto\" (the trainer's then apply) or make them equal")
    return raw
