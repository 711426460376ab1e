"""DeepSpeed-compatible configuration: pydantic models, JSON loading, batch-size resolution."""

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
