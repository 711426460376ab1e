"""The top-level config: core sections, feature sections owned by plugins, and the batch triple.

``parse_config`` is the one entry point. It rejects unknown keys (naming the nearest valid one),
sections whose package is not installed (naming the package), ``fp16`` and ``bf16`` together, unknown
optimizer and scheduler names, and an impossible batch triple — all before anything else happens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from .. import plugins
from ..errors import ConfigError, closest
from .loader import read_config
from .sections import (
    OPTIMIZERS,
    SCHEDULERS,
    ActivationCheckpointingConfig,
    AioConfig,
    Auto,
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

__all__ = ["DSConfig", "BatchSizes", "parse_config", "resolve_batch", "SECTION_PACKAGES"]

# Sections of a DeepSpeed config that a ds feature package owns, and which package to install.
SECTION_PACKAGES = {
    "zero_optimization": "ds-zero",
    "pipeline": "ds-pipe",
    "moe": "ds-moe",
    "compression_training": "ds-compress",
    "quantize_training": "ds-compress",
    "weight_quantization": "ds-compress",
    "tensor_parallel": "ds-infer",
    "inference": "ds-infer",
}

# DeepSpeed keys we accept so a DeepSpeed config loads unchanged, but that have no effect here.
ACCEPTED_WITHOUT_EFFECT = (
    "amp", "autotuning", "comet", "compile", "curriculum_learning", "data_efficiency",
    "data_types", "dataloader_drop_last", "eigenvalue", "elasticity", "flops_profiler",
    "graph_harvesting", "hybrid_engine", "nebula", "progressive_layer_drop", "sparse_attention",
    "timers", "use_data_before_expert_parallelism", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "disable_allgather", "load_universal_checkpoint",
    "memory_breakdown", "dump_state", "sparse_gradients", "torch_autocast",
)

ALIASES = {"bfloat16": "bf16"}


@dataclass(frozen=True)
class BatchSizes:
    train_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int


class DSConfig(Section):
    """A DeepSpeed-compatible training config. Build it with :func:`parse_config`."""

    train_batch_size: int | Auto | None = Field(None, description="Global batch: micro × accumulation × data-parallel ranks.")
    train_micro_batch_size_per_gpu: int | Auto | None = Field(None, description="Samples per rank per forward.")
    gradient_accumulation_steps: int | Auto | None = Field(None, description="Micro-batches per optimizer step.")
    gradient_clipping: float | Auto = Field(0.0, description="Clip by global gradient norm; 0 disables.")
    prescale_gradients: bool = Field(False, description="Divide gradients before the all-reduce, not after.")
    gradient_predivide_factor: float = Field(1.0, gt=0, description="Divide by this before, by world/this after.")
    steps_per_print: int | None = Field(10, description="Log a line every N optimizer steps.")
    wall_clock_breakdown: bool = Field(False, description="Time forward, backward, reduce and step.")
    seed: int | None = Field(None, description="Seed torch, numpy and random on every rank.")
    communication_data_type: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="dtype of the gradient all-reduce; fp32 accumulation either way.")
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config)
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig)
    activation_checkpointing: ActivationCheckpointingConfig = Field(default_factory=ActivationCheckpointingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    csv_monitor: CSVMonitorConfig = Field(default_factory=CSVMonitorConfig)
    aio: AioConfig = Field(default_factory=AioConfig)

    _features: dict[str, Any] = PrivateAttr(default_factory=dict)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _batch: BatchSizes | None = PrivateAttr(None)

    # -- feature sections ----------------------------------------------------------------------
    @property
    def features(self) -> dict[str, Any]:
        """Feature sections present in the config, validated by their owning package's model."""
        return dict(self._features)

    def section(self, name: str) -> Any | None:
        """A core or feature section by its config key (``None`` when absent)."""
        if name in type(self).model_fields:
            return getattr(self, name)
        return self._features.get(name)

    @property
    def raw(self) -> dict[str, Any]:
        """The config exactly as given (for checkpoints and logs)."""
        return dict(self._raw)

    # -- precision -----------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        if self.fp16.enabled is True:
            return "fp16"
        if self.bf16.enabled is True:
            return "bf16"
        return "fp32"

    # -- batch sizes ---------------------------------------------------------------------------
    @property
    def batch(self) -> BatchSizes:
        if self._batch is None:
            raise ConfigError(
                "batch sizes are not resolved yet; call config.resolve_batch(data_parallel_size)"
            )
        return self._batch

    def resolve_batch(self, data_parallel_size: int) -> BatchSizes:
        self._batch = resolve_batch(
            _unauto(self.train_batch_size),
            _unauto(self.train_micro_batch_size_per_gpu),
            _unauto(self.gradient_accumulation_steps),
            data_parallel_size,
        )
        return self._batch


def _unauto(value: Any) -> Any:
    return None if value == "auto" else value


def resolve_batch(
    train_batch: int | None, micro: int | None, accumulation: int | None, dp: int
) -> BatchSizes:
    """Solve train_batch_size = micro × accumulation × dp from the given values (DeepSpeed's rules)."""
    for name, value in (("train_batch_size", train_batch),
                        ("train_micro_batch_size_per_gpu", micro),
                        ("gradient_accumulation_steps", accumulation)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{name} = {value!r} must be a positive integer")
    if dp <= 0:
        raise ConfigError(f"data-parallel size {dp} must be positive")

    def need_divisible(total: int, by: int, what: str) -> int:
        if total % by:
            raise ConfigError(
                f"train_batch_size {total} is not divisible by {what} = {by}; pick a "
                f"train_batch_size that is a multiple of {by}, or set "
                f"train_micro_batch_size_per_gpu and gradient_accumulation_steps instead"
            )
        return total // by

    if train_batch and micro and accumulation:
        if train_batch != micro * accumulation * dp:
            raise ConfigError(
                f"train_batch_size {train_batch} != {micro} micro × {accumulation} accumulation × "
                f"{dp} ranks = {micro * accumulation * dp}; set one of them consistently or drop "
                f"train_batch_size"
            )
    elif train_batch and micro:
        accumulation = need_divisible(train_batch, micro * dp, f"{micro} micro × {dp} ranks")
    elif train_batch and accumulation:
        micro = need_divisible(train_batch, accumulation * dp, f"{accumulation} accumulation × {dp} ranks")
    elif micro and accumulation:
        train_batch = micro * accumulation * dp
    elif train_batch:
        accumulation = 1
        micro = need_divisible(train_batch, dp, f"{dp} ranks")
    elif micro:
        accumulation = 1
        train_batch = micro * dp
    else:
        raise ConfigError(
            "no batch size given: set train_batch_size or train_micro_batch_size_per_gpu "
            "(gradient_accumulation_steps alone cannot determine the batch)"
        )
    return BatchSizes(train_batch, micro, accumulation, dp)


# -- validation -------------------------------------------------------------------------------

def _check_keys(model: type[BaseModel], data: Any, path: str) -> None:
    """Reject unknown keys anywhere inside a section, naming the nearest valid key."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    valid = set(fields) | {f.alias for f in fields.values() if f.alias}
    for key, value in data.items():
        if key not in valid:
            raise ConfigError(
                f"unknown config key {path}{key!r}{closest(key, valid)}; valid keys here: "
                f"{', '.join(sorted(valid))}"
            )
        annotation = fields[key].annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                _check_keys(candidate, value, f"{path}{key}.")


def _validate(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    _check_keys(model, data, f"{where}." if where else "")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
        raise ConfigError(
            f"config value {loc} = {err.get('input')!r} is invalid: {err['msg']}; see docs/config.md "
            f"for the allowed values"
        ) from None


def _check_choice(kind: str, name: str, allowed: tuple[str, ...], any_case: bool) -> None:
    # DeepSpeed matches optimizer names in any case but scheduler names exactly.
    ok = name.lower() in {a.lower() for a in allowed} if any_case else name in allowed
    if not ok:
        raise ConfigError(
            f"{kind}.type {name!r} is not supported{closest(name, allowed)}; choose one of "
            f"{', '.join(allowed)}, or pass your own {kind} object to initialize()"
        )


def parse_config(source: Any, data_parallel_size: int | None = None) -> DSConfig:
    """Validate a DeepSpeed JSON config (dict, JSON string or file path) into a :class:`DSConfig`."""
    if isinstance(source, DSConfig):
        config = source
        if data_parallel_size is not None:
            config.resolve_batch(data_parallel_size)
        return config
    raw, where = read_config(source)
    core_keys = set(DSConfig.model_fields)
    core: dict[str, Any] = {}
    feature_raw: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name in core_keys:
            if name in core:
                raise ConfigError(f"{where}: both {key!r} and its alias set {name!r}; keep one")
            core[name] = value
        elif plugins.feature_for_section(name) is not None:
            feature_raw[name] = value
        elif name in SECTION_PACKAGES:
            raise ConfigError(
                f"{where}: section {name!r} needs the {SECTION_PACKAGES[name]} package, which is "
                f"not installed; run `pip install {SECTION_PACKAGES[name]}` or remove the section"
            )
        elif name in ACCEPTED_WITHOUT_EFFECT:
            if value not in (None, False, {}, []) and not (isinstance(value, dict) and value.get("enabled") is False):
                warnings.warn(f"{where}: DeepSpeed key {name!r} is accepted but has no effect in ds",
                              UserWarning, stacklevel=2)
        else:
            choices = core_keys | set(SECTION_PACKAGES) | set(ACCEPTED_WITHOUT_EFFECT)
            raise ConfigError(
                f"{where}: unknown config key {key!r}{closest(key, choices)}; see docs/config.md "
                f"for every key"
            )

    config = _validate(DSConfig, core, "")
    assert isinstance(config, DSConfig)
    config._raw = raw
    for section, value in feature_raw.items():
        spec = plugins.feature_for_section(section)
        model = spec.load_config_model() if spec else None
        config._features[section] = _validate(model, value, section) if model else value

    if config.fp16.enabled is True and config.bf16.enabled is True:
        raise ConfigError(
            f"{where}: fp16.enabled and bf16.enabled are both true; a run has one precision: "
            f"disable one of them"
        )
    if config.optimizer is not None:
        _check_choice("optimizer", config.optimizer.type, OPTIMIZERS, any_case=True)
    if config.scheduler is not None:
        _check_choice("scheduler", config.scheduler.type, SCHEDULERS, any_case=False)
    if isinstance(config.gradient_clipping, float) and config.gradient_clipping < 0:
        raise ConfigError(f"gradient_clipping {config.gradient_clipping} must be >= 0 (0 disables it)")
    if data_parallel_size is not None:
        config.resolve_batch(data_parallel_size)
    return config
