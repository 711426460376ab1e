"""How a config of the corpus is used, and what ds makes of it (shared by the test and the acceptance script).

Most public configs are written for the Hugging Face Trainer, which fills their ``"auto"`` values
before DeepSpeed sees them; :func:`outcome` does the same with :func:`ds_core.config.resolve_auto`
and one set of Trainer values (2 data-parallel ranks, micro-batch 4, lr 2e-5, bf16, 1000 steps of
which 10 warm up, hidden size 1024). The batch triple is then checked at the data-parallel size the
config implies (``train_batch_size / (micro × accumulation)``) or 1.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TRAINER = dict(per_device_train_batch_size=4, world_size=2, learning_rate=2e-5, weight_decay=0.0, adam_beta1=0.9,
               adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, warmup_steps=10, num_training_steps=1000,
               hidden_size=1024, fp16=False, bf16=True)


def files(kind: str) -> list[Path]:
    """The corpus (``corpus``: real configs) or the planted errors (``broken``), sorted."""
    return sorted(p for p in (HERE / kind).rglob("*.json") if p.is_file())


def expected() -> dict[str, str]:
    """The recorded outcome of every file: ``accept``, ``refuse: <feature>`` or ``reject: <fix>``."""
    return json.loads((HERE / "expected.json").read_text())["outcomes"]


def _has_auto(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_auto(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_auto(v) for v in value)
    return isinstance(value, str) and value.strip().lower() == "auto"


def as_used(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as the Trainer hands it over: "auto" filled from :data:`TRAINER` (explicit values win),
    and the batch given to a config that sets none (Accelerate fills it in)."""
    from ds_core.config import resolve_auto

    batch = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    if not _has_auto(raw) and any(k in raw for k in batch):
        return raw
    gas = raw.get("gradient_accumulation_steps")
    values = dict(TRAINER, gradient_accumulation_steps=gas if isinstance(gas, int) and not isinstance(gas, bool)
                  else 1)
    return resolve_auto(raw, check=False, **values)


def data_parallel_size(config: dict[str, Any]) -> int:
    t, m, g = (config.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                        "gradient_accumulation_steps"))
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (t, m, g)) and t % (m * g) == 0:
        return t // (m * g)
    return 1


def outcome(config: dict[str, Any]) -> tuple[str, str, list[str]]:
    """("accept", "", warnings) or ("error", message, warnings) for a config (already as used)."""
    from ds_core.config import parse_config
    from ds_core.errors import ConfigError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parse_config(config, data_parallel_size=data_parallel_size(config))
        except ConfigError as exc:
            return "error", str(exc), [str(w.message) for w in caught]
    return "accept", "", [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
