"""ds-zero: ZeRO stages 1-3 (partitioned optimizer state, gradients and parameters) with CPU and NVMe offload.

Enabled by a ``zero_optimization`` section in a ds/DeepSpeed config; the engine picks up this
package's data-parallel strategy (one object per stage, ``strategy.py``) through the feature seam, so
nothing here needs to be imported to train. The names below are for inspection, memory
accounting and tests — except :class:`Init` and :class:`GatheredParameters`, the stage-3 contexts
for building a partitioned model and touching its full parameters. They are imported on first use,
so validating a config stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.0.1"

_EXPORTS = {
    "ZeroConfig": "config",
    "OffloadOptimizerConfig": "config",
    "Partitions": "partition",
    "GroupPartition": "partition",
    "AllReduceGradients": "reduce",
    "PartitionedGradientReducer": "reduce",
    "ZeroOptimizer": "optimizer",
    "ZeroStrategy": "strategy",
    "Zero1Strategy": "strategy",
    "Stage3Strategy": "strategy",
    "estimate_memory": "memory",
    "memory_report": "memory",
    "format_memory_table": "memory",
    "Stage3Partitions": "stage3",
    "Stage3GradientReducer": "reduce3",
    "GatheredParameters": "gathered",
    "ModifiedOnNonModifierRankError": "gathered",
    "Init": "init_context",
    "is_zero_init_parameter": "init_context",
    "zero_to_fp32": "consolidate",
    "get_fp32_state_dict_from_zero_checkpoint": "consolidate",
    "load_state_dict_from_zero_checkpoint": "consolidate",
    "gathered_state_dict": "checkpoint3",
    "SwapError": "swap",
    "ModulePathMismatchError": "fingerprint",
    "GatherTimeoutError": "fingerprint",
    "ReleasedParameterError": "released",
    "ReleasedTensor": "released",
    "ZeroParameter": "released",
    "register_external_parameter": "released",
    "unregister_external_parameter": "released",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ds_zero' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
