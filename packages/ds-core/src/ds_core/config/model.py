"""The top-level config: core sections, feature sections owned by plugins, and the batch triple.

``parse_config`` is the one entry point. In order, before anything else happens:

1. the key pass (:mod:`ds_core.config.screen`) applies the table of DeepSpeed's keys: comments
   dropped, typos refused with the fix, features ds lacks refused by name, keys without effect
   warned about once, sections of missing packages refused with the package to install;
2. ds-core's model and each feature package's model validate the values (strictly: see
   :mod:`ds_core.config.values`);
3. cross-section rules: one precision, optimizer and scheduler ``params`` against their schemas
   (:mod:`ds_core.config.optim`), the batch triple when the data-parallel size is known.

The result, :class:`DSConfig`, is read by attribute (``config.fp16.loss_scale``) and, like
DeepSpeed's ``engine.config``, as a dict: ``config["zero_optimization"]["stage"]``,
``config.get("train_micro_batch_size_per_gpu")``, ``"bf16" in config``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator

from .. import plugins
from ..errors import ConfigError
from ..profiling.flops import FlopsProfilerConfig
from .data_efficiency import (
    CurriculumLearningConfig,
    DataEfficiencyConfig,
    ProgressiveLayerDropConfig,
)
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
    DataTypesConfig,
    FP16Config,
    OptimizerConfig,
    SchedulerConfig,
    Section,
    TensorBoardConfig,
    WandbConfig,
)
from .values import value_error

__all__ = ["DSConfig", "BatchSizes", "parse_config", "resolve_batch", "ConfigWarning",
           "OPTIMIZERS", "SCHEDULERS"]


class ConfigWarning(UserWarning):
    """A config key that is accepted but has no effect in ds, or an unknown key that is ignored."""


def _section_packages() -> dict[str, str]:
    from .keys import children

    return {name: e.by for name, e in children("").items() if e.status == "package" and e.by}


def __getattr__(name: str) -> Any:
    # SECTION_PACKAGES: the sections a ds feature package owns, and which package to install (read
    # from the key table, so there is one list; loaded on first use to keep `import` cheap).
    if name == "SECTION_PACKAGES":
        return _section_packages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_DTYPES = ("fp32", "bf16", "fp16")


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
    gradient_predivide_factor: float = Field(1.0, description="Divide by this before, by world/this after.")
    steps_per_print: int | None = Field(10, description="Log a line every N optimizer steps.")
    wall_clock_breakdown: bool = Field(False, description="Time forward, backward, reduce and step.")
    seed: int | None = Field(None, description="Seed torch, numpy and random on every rank.")
    communication_data_type: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="dtype of the gradient all-reduce; fp32 accumulation either way.")
    data_parallel_size: int | None = Field(
        None, description="Data-parallel ranks; when set it must match the launch (checked with the batch).")
    sequence_parallel_size: int = Field(
        1, description="Ranks that split each sequence (Ulysses); read by ds-parallel, which a value > 1 needs.")
    seq_parallel_communication_data_type: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype of the sequence-parallel all-to-all; read by ds-parallel.")
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config)
    data_types: DataTypesConfig = Field(default_factory=DataTypesConfig)
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig)
    activation_checkpointing: ActivationCheckpointingConfig = Field(default_factory=ActivationCheckpointingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    csv_monitor: CSVMonitorConfig = Field(default_factory=CSVMonitorConfig)
    aio: AioConfig = Field(default_factory=AioConfig)
    flops_profiler: FlopsProfilerConfig = Field(default_factory=FlopsProfilerConfig)
    curriculum_learning: CurriculumLearningConfig = Field(default_factory=CurriculumLearningConfig)
    progressive_layer_drop: ProgressiveLayerDropConfig = Field(default_factory=ProgressiveLayerDropConfig)
    data_efficiency: DataEfficiencyConfig = Field(default_factory=DataEfficiencyConfig)

    _features: dict[str, Any] = PrivateAttr(default_factory=dict)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _given: dict[str, Any] = PrivateAttr(default_factory=dict)
    _batch: BatchSizes | None = PrivateAttr(None)

    # -- value rules ---------------------------------------------------------------------------
    @field_validator(*_BATCH_KEYS, "data_parallel_size", "sequence_parallel_size")
    @classmethod
    def _at_least_one(cls, value: Any, info) -> Any:
        if isinstance(value, int) and value < 1:
            allowed = ", 'auto'" if info.field_name in _BATCH_KEYS else ""
            raise value_error(f"{value} must be a whole number >= 1{allowed}; a batch needs at least one sample "
                              f"and a group at least one rank" if info.field_name in _BATCH_KEYS else
                              f"{value} must be a whole number >= 1 (a number of ranks)")
        return value

    @field_validator("gradient_clipping")
    @classmethod
    def _clip(cls, value: Any) -> Any:
        if isinstance(value, float) and value < 0:
            raise value_error(f"{value} must be >= 0: it is the largest global gradient norm kept (0 disables "
                              "clipping)")
        return value

    @field_validator("gradient_predivide_factor")
    @classmethod
    def _predivide(cls, value: float) -> float:
        if value <= 0:
            raise value_error(f"{value} must be > 0: gradients are divided by it before the all-reduce (1.0: "
                              "no pre-division)")
        return value

    @field_validator("steps_per_print")
    @classmethod
    def _every(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise value_error(f"{value} must be a whole number >= 0: the step log is written every N optimizer "
                              "steps, and 0 (or null) turns it off")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**32:
            raise value_error(f"{value} is outside the seed range [0, 2**32 - 1] that torch, numpy and random all "
                              "accept; use a non-negative seed such as 42")
        return value

    @field_validator("communication_data_type", "seq_parallel_communication_data_type", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        # DeepSpeed lower-cases these names.
        if isinstance(value, str) and value.strip().lower() in _DTYPES:
            return value.strip().lower()
        return value

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
        if self.data_parallel_size is not None and self.data_parallel_size != data_parallel_size:
            raise ConfigError(
                f"data_parallel_size {self.data_parallel_size} in the config != {data_parallel_size} data-parallel "
                f"ranks in this launch; launch {self.data_parallel_size} data-parallel ranks, or remove "
                f"data_parallel_size (ds derives it from the launch)")
        values = {k: getattr(self, k) for k in _BATCH_KEYS}
        autos = [k for k, v in values.items() if v == "auto"]
        try:
            self._batch = resolve_batch(*(None if v == "auto" else v for v in values.values()), data_parallel_size)
        except ConfigError as exc:
            if autos and "no batch size given" in str(exc):
                raise ConfigError(
                    f"{', '.join(autos)} {'is' if len(autos) == 1 else 'are'} 'auto' and nothing resolved "
                    f"{'it' if len(autos) == 1 else 'them'}: a number is needed to build the batch. Write the "
                    f"number, or pass the trainer's values through ds_core.config.resolve_auto(config, "
                    f"per_device_train_batch_size=..., gradient_accumulation_steps=..., world_size=...)") from None
            raise
        return self._batch

    # -- read like a dict (DeepSpeed's engine.config) --------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as DeepSpeed frameworks read ``engine.config``: the keys given (comments
        dropped, other spellings under their key), each section with every value in effect, and the
        batch triple once it is resolved."""
        out: dict[str, Any] = {}
        for key, given in self._given.items():
            out[key] = self._effective(key, given)
        if self._batch is not None:
            out["train_batch_size"] = self._batch.train_batch_size
            out["train_micro_batch_size_per_gpu"] = self._batch.micro_batch_size
            out["gradient_accumulation_steps"] = self._batch.gradient_accumulation_steps
        return out

    def _effective(self, key: str, given: Any) -> Any:
        current: Any = given
        if key in type(self).model_fields:
            current = getattr(self, key)
        elif key in self._features:
            current = self._features[key]
        if isinstance(current, BaseModel):
            return _merge(given if isinstance(given, dict) else {}, current.model_dump())
        return current

    def __getitem__(self, key: str) -> Any:
        view = self.to_dict()
        if key not in view:
            raise KeyError(key)
        return view[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def keys(self):
        return self.to_dict().keys()

    def values(self):
        return self.to_dict().values()

    def items(self):
        return self.to_dict().items()

    def __iter__(self):  # type: ignore[override]
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __bool__(self) -> bool:
        return True


def _merge(given: dict[str, Any], effective: dict[str, Any]) -> dict[str, Any]:
    """``given`` with every value the model holds written over it (recursively)."""
    out = {k: v for k, v in given.items() if not (isinstance(k, str) and k.startswith("_"))}
    for key, value in effective.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_batch(
    train_batch: int | None, micro: int | None, accumulation: int | None, dp: int
) -> BatchSizes:
    """Solve train_batch_size = micro × accumulation × dp from the given values (DeepSpeed's rules)."""
    for name, value in (("train_batch_size", train_batch),
                        ("train_micro_batch_size_per_gpu", micro),
                        ("gradient_accumulation_steps", accumulation)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
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

def _validate(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"config key {loc} is not accepted by {model.__name__}; remove it") from None
        if err["type"] == "missing":
            raise ConfigError(f"config key {loc} is missing: its section needs it") from None
        if err["type"] == "value_error":  # a rule of the section's own validators: its message says it all
            message = str(err["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"config section {loc or 'top level'} is invalid: {message}") from None
        rule = err["msg"] if err["type"] == "ds_value" else f"{err['msg']}; see docs/config.md for the allowed values"
        raise ConfigError(f"config value {loc} = {err.get('input')!r} is invalid: {rule}") from None


def _rank() -> int:
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def _checked(screened: Any, raw: dict[str, Any], data_parallel_size: int | None) -> DSConfig:
    """Validate the screened sections and apply the rules across them."""
    from .optim import check_optimizer, check_scheduler

    config = _validate(DSConfig, screened.core, "")
    assert isinstance(config, DSConfig)
    config._raw = raw
    config._given = screened.given
    for section, value in screened.features.items():
        spec = plugins.feature_for_section(section)
        model = spec.load_config_model() if spec else None
        config._features[section] = _validate(model, value, section) if model else value
    if config.fp16.enabled is True and config.bf16.enabled is True:
        raise ConfigError("fp16.enabled and bf16.enabled are both true; a run has one precision: disable one of them")
    if config.optimizer is not None:
        check_optimizer(config.optimizer.type, config.optimizer.params)
        _check_onebit_zero(config)
    if config.scheduler is not None:
        check_scheduler(config.scheduler.type, config.scheduler.params)
    if data_parallel_size is not None:
        config.resolve_batch(data_parallel_size)
    return config


def _check_onebit_zero(config: DSConfig) -> None:
    """1-bit optimizers run on plain data parallelism: refuse a ZeRO stage >= 1 before any process group."""
    name = str(config.optimizer.type).strip()
    if name.lower() not in ("onebitadam", "zerooneadam", "onebitlamb"):
        return
    zero = config.section("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else getattr(zero, "stage", 0)
    total = config.scheduler.params.get("total_num_steps") if config.scheduler is not None else None
    for key in ("freeze_step", "var_freeze_step"):
        value = config.optimizer.params.get(key)
        if isinstance(total, int) and isinstance(value, int) and not isinstance(value, bool) and value >= total:
            raise ConfigError(f"optimizer {name}: {key} {value} is past the run (scheduler total_num_steps {total}): "
                              f"compression would never start; set {key} below {total} (about 15-25% of the steps "
                              f"is usual for the warm-up)")
    if isinstance(stage, int) and stage >= 1:
        raise ConfigError(f"optimizer.type {name!r} (1-bit compressed communication) runs on plain data "
                          f"parallelism, but zero_optimization.stage is {stage}: ZeRO stage {stage} is not supported "
                          f"with it (nor by DeepSpeed); set zero_optimization.stage to 0, or use Adam/Lamb with ZeRO")


def parse_config(source: Any, data_parallel_size: int | None = None) -> DSConfig:
    """Validate a DeepSpeed JSON config (dict, JSON string or file path) into a :class:`DSConfig`.

    Warnings (a :class:`ConfigWarning` per key without effect or unknown key ignored) are given on
    rank 0 only; errors are raised on every rank.
    """
    if isinstance(source, DSConfig):
        config = source
        if data_parallel_size is not None:
            config.resolve_batch(data_parallel_size)
        return config
    from .screen import screen

    raw, where = read_config(source)
    screened = screen(raw, where, DSConfig)
    try:
        config = _checked(screened, raw, data_parallel_size)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if _rank() == 0:
        for note in screened.notes:
            warnings.warn(note, ConfigWarning, stacklevel=2)
    return config
