"""Data efficiency: curriculum learning by sequence length, progressive layer drop, random-LTD.

In ds-core, not a feature package, because DeepSpeed users expect these keys to work with the base
install (DeepSpeed's engine reads them itself) and they act only on the forward's inputs and on the
model's own blocks — nothing of a strategy or a kernel. The engine builds :class:`DataEfficiency`
from the config (:func:`build_data_efficiency`) and calls it before each training forward; see
docs/data-efficiency.md. The config sections' models are in :mod:`ds_core.config.data_efficiency`.
"""

from .layers import LayerDrop, RandomLTD, find_blocks, layer_drop
from .runtime import DataEfficiency, build_data_efficiency
from .schedules import SCHEDULE_TYPES, DifficultySchedule, pld_theta

__all__ = [
    "DataEfficiency",
    "build_data_efficiency",
    "DifficultySchedule",
    "SCHEDULE_TYPES",
    "pld_theta",
    "LayerDrop",
    "RandomLTD",
    "find_blocks",
    "layer_drop",
]
