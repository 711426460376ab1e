"""DeepSpeed-compatible configuration: pydantic models, JSON loading, batch-size resolution.

``parse_config`` reads a DeepSpeed JSON config; ``deepspeed_keys.json`` (see :mod:`.keys`) says what
ds does with each of DeepSpeed's keys; ``resolve_auto`` fills ``"auto"`` values the way the Hugging
Face Trainer integration does. The rules are in docs/config.md.
"""

import gc

# Importing pydantic and building the models allocates many objects; with torch's large heap already
# alive, the full collections this triggers cost more than the import itself. Pause the collector.
_collecting = gc.isenabled()
gc.disable()
try:
    from .auto import resolve_auto
    from .model import BatchSizes, ConfigWarning, DSConfig, parse_config, resolve_batch
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


def __getattr__(name: str):
    # The key table loads on first use (parse_config needs it; a bare `import` does not).
    if name in ("key_table", "KeyEntry"):
        from . import keys

        return getattr(keys, name)
    if name == "SECTION_PACKAGES":
        from .model import _section_packages

        return _section_packages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DSConfig",
    "BatchSizes",
    "ConfigWarning",
    "parse_config",
    "resolve_batch",
    "resolve_auto",
    "key_table",
    "KeyEntry",
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
