"""Core config sections (owned by ds-core), as pydantic models with DeepSpeed's names and defaults.

Feature sections (``zero_optimization``, ``pipeline``, ``moe``, ...) are not here: the package that
registers them through ``ds.features`` owns their model, built on :class:`Section` so the same value
rules apply to it (see :mod:`ds_core.config.values`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .values import strict_value, value_error

__all__ = [
    "Section",
    "OptimizerConfig",
    "SchedulerConfig",
    "FP16Config",
    "BF16Config",
    "DataTypesConfig",
    "CommsLoggerConfig",
    "ActivationCheckpointingConfig",
    "CheckpointConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "CSVMonitorConfig",
    "AioConfig",
    "AUTO",
    "OPTIMIZERS",
    "SCHEDULERS",
]

AUTO = "auto"
Auto = Literal["auto"]

OPTIMIZERS = ("Adam", "AdamW", "SGD", "Adagrad", "Lamb", "Lion", "OneBitAdam", "ZeroOneAdam", "OneBitLamb")
SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")



class Section(BaseModel):
    """Base of every config section: unknown keys are rejected (with the nearest valid key), and a
    boolean, integer or float field takes only what JSON writes for it (no ``"yes"``, ``1`` for
    true, ``"2"`` for 2, ``NaN``): see :func:`~ds_core.config.values.strict_value`."""

    # defer_build: schemas are built on first validation, not at import (keeps `import` cheap)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              defer_build=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_value(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        return value if field is None else strict_value(field.annotation, value)


class OptimizerConfig(Section):
    type: str = Field(description=f"Optimizer name, one of {', '.join(OPTIMIZERS)} (any case).")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments; values may be 'auto'.")


class SchedulerConfig(Section):
    type: str = Field(description=f"Scheduler name, one of {', '.join(SCHEDULERS)}.")
    params: dict[str, Any] = Field(default_factory=dict, description="Scheduler parameters.")


class FP16Config(Section):
    enabled: bool | Auto = Field(False, description="Train in fp16 with dynamic loss scaling.")
    auto_cast: bool = Field(False, description="ds always casts floating inputs to fp16 (true); false has no "
                                               "effect and warns.")
    loss_scale: float = Field(0.0, ge=0, description="0 means dynamic scaling; > 0 is a static scale.")
    initial_scale_power: int = Field(16, ge=0, le=64, description="Dynamic scaling starts at 2**power.")
    loss_scale_window: int = Field(1000, gt=0, description="Overflow-free steps before the scale doubles.")
    hysteresis: int = Field(2, gt=0, description="Overflows tolerated before the scale halves.")
    consecutive_hysteresis: bool = Field(False, description="Refill hysteresis after each good step.")
    min_loss_scale: float = Field(1.0, ge=0, description="The dynamic scale never drops below this (> 0 when "
                                                        "fp16 scales dynamically).")
    fp16_master_weights_and_grads: bool = Field(False, description="Keep the masters (the fp16 weights "
                                                "themselves) and their gradients in fp16 (docs/precision.md).")

    @model_validator(mode="after")
    def _dynamic_floor(self) -> FP16Config:
        # As DeepSpeed: the floor matters only to dynamic scaling, so a static-scale or disabled fp16
        # section may carry any min_loss_scale >= 0.
        if self.enabled is True and self.loss_scale == 0 and self.min_loss_scale <= 0:
            raise ValueError(f"fp16.min_loss_scale {self.min_loss_scale} must be > 0 with dynamic loss scaling "
                             "(loss_scale 0): the scale halves on overflow down to this floor; use 1")
        return self


class BF16Config(Section):
    enabled: bool | Auto = Field(False, description="Train a bf16 model with fp32 master weights.")
    immediate_grad_update: bool = Field(False, description="ds adds each gradient into its fp32 buffer during "
                                                           "backward (true); false has no effect and warns.")
    bf16_master_weights_and_grads: bool = Field(False, description="Keep the masters (the bf16 weights themselves) "
                                                "and their gradients in bf16, updated with stochastic rounding "
                                                "(docs/precision.md).")
    bf16_optimizer_states: bool = Field(False, description="Keep the optimizer state (Adam's moments) in bf16.")


class DataTypesConfig(Section):
    """``data_types``: the dtypes of training state (only ``grad_accum_dtype`` has an effect)."""

    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="dtype of the gradient accumulation buffers (null: fp32, or the masters' dtype with "
                          "*_master_weights_and_grads).")
    master_weights_rounding: Literal["stochastic", "nearest"] = Field(
        "stochastic", description="ds only: how 16-bit masters take an update; nearest is for comparison.")

    @field_validator("grad_accum_dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        names = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32", "bf16": "bf16",
                 "bfloat16": "bf16", "torch.bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                 "torch.float16": "fp16"}
        if isinstance(value, str) and value.strip().lower() in names:
            return names[value.strip().lower()]
        return value


class CommsLoggerConfig(Section):
    enabled: bool = Field(False, description="Record every collective: count, bytes, latency, bandwidth.")
    verbose: bool = Field(False, description="Print each collective as it happens.")
    prof_all: bool = Field(True, description="Profile every op (else only prof_ops).")
    debug: bool = Field(False, description="No effect (callers are not recorded); true warns.")
    prof_ops: list[str] = Field(default_factory=list, description="Ops to profile when prof_all is false.")


class ActivationCheckpointingConfig(Section):
    partition_activations: bool = Field(False, description="Split saved activations over tensor ranks.")
    cpu_checkpointing: bool = Field(False, description="Keep checkpointed activations on the CPU.")
    contiguous_memory_optimization: bool = Field(False, description="Copy saved activations into one buffer.")
    number_checkpoints: int | None = Field(None, description="Checkpoints per step, for the contiguous buffer.")
    synchronize_checkpoint_boundary: bool = Field(False, description="Synchronize at each checkpoint.")
    profile: bool = Field(False, description="Time the checkpointed forward and recompute.")

    @field_validator("number_checkpoints")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise value_error(f"{value} must be > 0: it is the number of checkpointed regions per forward "
                              "(the contiguous buffer's slots); write that count, or null")
        return value


class CheckpointConfig(Section):
    tag_validation: Literal["Ignore", "Warn", "Fail", "ignore", "warn", "fail"] = Field(
        "Warn", description="No effect (tags are not compared across ranks); any value but Ignore warns."
    )
    load_universal: bool = Field(False, description="Always on: ds checkpoints load at any world size.")
    use_node_local_storage: bool = Field(False, description="No effect (save_dir must be shared); true warns.")
    parallel_write: dict[str, Any] = Field(default_factory=dict, description="No effect; pipeline_stage true warns.")


class TensorBoardConfig(Section):
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class WandbConfig(Section):
    enabled: bool = False
    group: str | None = None
    team: str | None = None
    project: str = "deepspeed"


class CSVMonitorConfig(Section):
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class AioConfig(Section):
    """Asynchronous I/O settings for NVMe offload (read by the ops and ZeRO packages)."""

    block_size: int = Field(1048576, gt=0, description="Bytes per I/O request.")
    queue_depth: int = Field(8, gt=0, description="Requests in flight per thread.")
    thread_count: int = Field(1, gt=0, description="I/O threads (DeepSpeed 0.19 spells it intra_op_parallelism; "
                                                 "both are read).")
    single_submit: bool = Field(False, description="Submit requests one at a time.")
    overlap_events: bool = Field(True, description="Always on; false has no effect and warns.")
    use_gds: bool = Field(False, description="No effect (no GPUDirect Storage path); true warns.")
