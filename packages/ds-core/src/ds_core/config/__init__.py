"""DeepSpeed-compatible configuration: pydantic models, JSON loading, batch-size resolution."""

import gc

# Importing pydantic and building the models allocates many objects; with torch's large heap already
# alive, the full collections this triggers cost more than the import itself. Pause the collector.
_collecting = gc.isenabled()
gc.disable()
try:
    from .model import SECTION_PACKAGES, BatchSizes, DSConfig, parse_config, resolve_batch
    from .sections import (
        ActivationCheckpointingConfig,
        AioConfig,
        BF16Config,
        CheckpointConfig,
        CommsLoggerConfig,
        CSVMonitorConfig,
        FP16Config,
        OptimizerConfig,
        SchedulerConfig,
        Section,
        TensorBoardConfig,
        WandbConfig,
    )
finally:
    if _collecting:
        gc.enable()

__all__ = [
    "DSConfig",
    "BatchSizes",
    "parse_config",
    "resolve_batch",
    "SECTION_PACKAGES",
    "Section",
    "OptimizerConfig",
    "SchedulerConfig",
    "FP16Config",
    "BF16Config",
    "CommsLoggerConfig",
    "ActivationCheckpointingConfig",
    "CheckpointConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "CSVMonitorConfig",
    "AioConfig",
]
