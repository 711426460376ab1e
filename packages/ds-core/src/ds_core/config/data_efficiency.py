"""The data-efficiency config sections, with DeepSpeed's keys and defaults (their effect: ds_core.data_efficiency).

- ``curriculum_learning`` (top level, DeepSpeed's legacy form): sequence-length curriculum.
- ``progressive_layer_drop``: keep probability θ(t) for stochastic layer skipping.
- ``data_efficiency``: ``data_sampling.curriculum_learning`` (the newer form; here its ``seqlen_truncate``
  metric, which needs no offline index) and ``data_routing.random_ltd`` (random layerwise token dropping).

Parts of the newer form that need DeepSpeed's offline data analysis (an index of each sample's metric)
are refused by name: ``clustering_type: "schedule_based"``, ``difficulty_type: "percentile"``, metrics
other than sequence length, and ``random_ltd.layer_token_lr_schedule``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from ..data_efficiency.schedules import DifficultySchedule
from ..errors import ConfigError
from .sections import Section

__all__ = [
    "CurriculumLearningConfig",
    "ProgressiveLayerDropConfig",
    "DataEfficiencyConfig",
    "DataSamplingConfig",
    "DataCurriculumConfig",
    "CurriculumMetricConfig",
    "DataRoutingConfig",
    "RandomLTDConfig",
    "RandomLTDScheduleConfig",
    "SEQLEN_METRICS",
]

#: metric names of the newer form that mean "truncate each sequence to the difficulty" (Megatron-DeepSpeed's)
SEQLEN_METRICS = ("seqlen_truncate", "seqlen")


class CurriculumLearningConfig(Section):
    """Top-level ``curriculum_learning`` (DeepSpeed's legacy form)."""

    enabled: bool = Field(False, description="Grow the sequence length with the step.")
    curriculum_type: str = Field("seqlen", description="Only 'seqlen': the difficulty is a sequence length.")
    min_difficulty: int | None = Field(None, description="Sequence length at step 0.")
    max_difficulty: int | None = Field(None, description="Sequence length at the end; at most the data's.")
    schedule_type: str | None = Field(None, description="fixed_linear, fixed_root or fixed_discrete.")
    schedule_config: dict[str, Any] = Field(
        default_factory=dict, description="total_curriculum_step, difficulty_step (root_degree for fixed_root); "
                                          "difficulty and max_step lists for fixed_discrete.")

    @model_validator(mode="after")
    def _check(self) -> CurriculumLearningConfig:
        if self.enabled:
            self.schedule()
        return self

    def schedule(self, where: str = "curriculum_learning") -> DifficultySchedule:
        if self.curriculum_type != "seqlen":
            raise ConfigError(f"{where}.curriculum_type {self.curriculum_type!r} is not supported: ds's curriculum "
                              f"is by sequence length only; use 'seqlen'")
        return _difficulty_schedule(where, self, f"{where} is enabled but has")


class ProgressiveLayerDropConfig(Section):
    """``progressive_layer_drop``: θ(t) = (1 − theta)·exp(−gamma·t) + theta."""

    enabled: bool = Field(False, description="Skip layers with a probability that grows with step and depth.")
    theta: float = Field(1.0, description="The keep probability θ(t) decays towards (0 < theta <= 1).")
    gamma: float = Field(0.001, description="Decay rate of θ(t) per optimizer step (>= 0).")

    @model_validator(mode="after")
    def _check(self) -> ProgressiveLayerDropConfig:
        if not 0.0 < self.theta <= 1.0:
            raise ConfigError(f"progressive_layer_drop.theta {self.theta} must be in (0, 1]: it is the keep "
                              f"probability the schedule decays to (the PLD paper uses 0.5)")
        if self.gamma < 0:
            raise ConfigError(f"progressive_layer_drop.gamma {self.gamma} must be >= 0: it is the decay rate of "
                              f"the keep probability per step (DeepSpeed's default 0.001)")
        return self


class CurriculumMetricConfig(Section):
    """One entry of ``data_sampling.curriculum_learning.curriculum_metrics``."""

    index_to_sample_path: str | None = Field(None, description="Not read: the seqlen metric needs no index.")
    index_to_metric_path: str | None = Field(None, description="Not read: the seqlen metric needs no index.")
    difficulty_type: str = Field("value", description="Only 'value' (the difficulty is a sequence length).")
    clustering_type: str = Field("single_cluster", description="Only 'single_cluster'.")
    min_difficulty: int | None = Field(None, description="Sequence length at step 0.")
    max_difficulty: int | None = Field(None, description="Sequence length at the end.")
    schedule_type: str | None = Field(None, description="fixed_linear, fixed_root or fixed_discrete.")
    schedule_config: dict[str, Any] = Field(default_factory=dict, description="As the legacy form's.")


class DataCurriculumConfig(Section):
    enabled: bool = Field(False, description="Apply the curriculum metrics.")
    data_cluster_path: str | None = Field(None, description="Not read (no offline clustering).")
    # dict[str, Any] so the key pass hands the metrics over whole; each is validated below
    curriculum_metrics: dict[str, Any] = Field(
        default_factory=dict, description="metric name -> schedule; ds supports one 'seqlen_truncate' metric.")

    @field_validator("curriculum_metrics")
    @classmethod
    def _metrics(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {name: CurriculumMetricConfig.model_validate(body) for name, body in value.items()}


class DataSamplingConfig(Section):
    enabled: bool = Field(False, description="Turn data sampling (the curriculum) on.")
    num_epochs: int = Field(1000, description="Not read: the training loop decides the epochs.")
    num_workers: int = Field(0, description="Not read: pass num_workers to your own DataLoader.")
    curriculum_learning: DataCurriculumConfig = Field(default_factory=DataCurriculumConfig)


class RandomLTDScheduleConfig(Section):
    min_value: int | None = Field(None, description="Tokens kept per chosen layer at step 0.")
    max_value: int | None = Field(None, description="Tokens kept at the end (the full sequence length).")
    schedule_type: str = Field("fixed_linear", description="Only 'fixed_linear'.")
    schedule_config: dict[str, Any] = Field(default_factory=dict, description="require_steps, seq_per_step.")


class RandomLTDConfig(Section):
    enabled: bool = Field(False, description="Chosen layers process a random subset of the tokens.")
    total_layer_num: int | None = Field(None, description="The model's layer count (checked when given).")
    random_ltd_layer_num: int | None = Field(None, description="How many layers drop tokens.")
    random_ltd_layer_id: list[int] = Field(default_factory=list, description="Which layers (0-based).")
    model_mask_name: str | None = Field(None, description="Keyword of the attention mask a layer takes.")
    model_type: str = Field("decoder", description="Only 'decoder' (causal attention keeps its order).")
    hidden_state_order: str = Field("batch_seq_dim", description="batch_seq_dim or seq_batch_dim.")
    random_ltd_schedule: RandomLTDScheduleConfig = Field(default_factory=RandomLTDScheduleConfig)
    layer_token_lr_schedule: dict[str, Any] = Field(default_factory=dict, description="Refused when enabled.")
    global_batch_size: int | None = Field(None, description="Not read (the engine knows the batch).")
    micro_batch_size: int | None = Field(None, description="Not read (the engine knows the batch).")

    def schedule(self, where: str) -> DifficultySchedule:
        s = self.random_ltd_schedule
        return DifficultySchedule(f"{where}.random_ltd_schedule", s.min_value, s.max_value, s.schedule_type,
                                  s.schedule_config, total_key="require_steps", step_key="seq_per_step",
                                  min_key="min_value", max_key="max_value", types=("fixed_linear",))


class DataRoutingConfig(Section):
    enabled: bool = Field(False, description="Turn data routing (random-LTD) on.")
    random_ltd: RandomLTDConfig = Field(default_factory=RandomLTDConfig)


class DataEfficiencyConfig(Section):
    """``data_efficiency``: DeepSpeed's data efficiency library, the parts that need no offline index."""

    enabled: bool = Field(False, description="Turn the library on (its parts have their own enabled).")
    seed: int = Field(1234, description="Seed of random-LTD's token choice (same on every rank).")
    data_sampling: DataSamplingConfig = Field(default_factory=DataSamplingConfig)
    data_routing: DataRoutingConfig = Field(default_factory=DataRoutingConfig)

    @model_validator(mode="after")
    def _check(self) -> DataEfficiencyConfig:
        self.curriculum_schedule()
        self.random_ltd_schedule()
        return self

    def curriculum_schedule(self) -> DifficultySchedule | None:
        """The seqlen schedule of ``data_sampling.curriculum_learning`` when it is in effect."""
        sampling = self.data_sampling
        if not (self.enabled and sampling.enabled and sampling.curriculum_learning.enabled):
            return None
        where = "data_efficiency.data_sampling.curriculum_learning"
        metrics = sampling.curriculum_learning.curriculum_metrics
        if not metrics:
            raise ConfigError(f"{where} is enabled but has no curriculum_metrics; add a 'seqlen_truncate' metric")
        others = [name for name in metrics if name not in SEQLEN_METRICS]
        if others or len(metrics) > 1:
            raise ConfigError(
                f"{where}.curriculum_metrics {sorted(metrics)}: ds supports one sequence-length metric "
                f"({' or '.join(map(repr, SEQLEN_METRICS))}); metrics such as {others or sorted(metrics)[1:]} need "
                f"DeepSpeed's offline data analysis index, which ds does not build: keep one seqlen_truncate metric")
        name, metric = next(iter(metrics.items()))
        here = f"{where}.curriculum_metrics.{name}"
        if metric.clustering_type != "single_cluster":
            raise ConfigError(f"{here}.clustering_type {metric.clustering_type!r} is not supported: it samples "
                              f"from DeepSpeed's offline index (index_to_sample_path); use 'single_cluster'")
        if metric.difficulty_type != "value":
            raise ConfigError(f"{here}.difficulty_type {metric.difficulty_type!r} is not supported: percentiles "
                              f"need DeepSpeed's offline index; use 'value' (the difficulty is a sequence length)")
        return _difficulty_schedule(here, metric, f"{here} has")

    def random_ltd(self) -> RandomLTDConfig | None:
        """The random-LTD section when it is in effect."""
        routing = self.data_routing
        if self.enabled and routing.enabled and routing.random_ltd.enabled:
            return routing.random_ltd
        return None

    def random_ltd_schedule(self) -> DifficultySchedule | None:
        ltd = self.random_ltd()
        if ltd is None:
            return None
        where = "data_efficiency.data_routing.random_ltd"
        if ltd.layer_token_lr_schedule.get("enabled"):
            raise ConfigError(f"{where}.layer_token_lr_schedule is enabled: ds does not scale the learning rate by "
                              f"the tokens each layer saw; remove it (or set enabled false)")
        if ltd.model_type != "decoder":
            raise ConfigError(f"{where}.model_type {ltd.model_type!r} is not supported: ds's random-LTD is for "
                              f"GPT-style decoders; use 'decoder'")
        if ltd.hidden_state_order not in ("batch_seq_dim", "seq_batch_dim"):
            raise ConfigError(f"{where}.hidden_state_order {ltd.hidden_state_order!r} must be 'batch_seq_dim' "
                              f"or 'seq_batch_dim'")
        if not ltd.random_ltd_layer_id:
            raise ConfigError(f"{where} is enabled but random_ltd_layer_id is empty; list the layers that drop "
                              f"tokens")
        if ltd.random_ltd_layer_num is not None and ltd.random_ltd_layer_num != len(ltd.random_ltd_layer_id):
            raise ConfigError(f"{where}.random_ltd_layer_num {ltd.random_ltd_layer_num} != "
                              f"{len(ltd.random_ltd_layer_id)} layers in random_ltd_layer_id; make them agree")
        if len(set(ltd.random_ltd_layer_id)) != len(ltd.random_ltd_layer_id) or min(ltd.random_ltd_layer_id) < 0:
            raise ConfigError(f"{where}.random_ltd_layer_id {ltd.random_ltd_layer_id} must be distinct layer "
                              f"indices >= 0")
        return ltd.schedule(where)


def _difficulty_schedule(where: str, section, missing: str) -> DifficultySchedule:
    """The schedule of a curriculum section (legacy or one metric of the newer form), after checking the
    keys every schedule but ``fixed_discrete`` needs."""
    if section.schedule_type != "fixed_discrete":
        for key in ("min_difficulty", "max_difficulty", "schedule_type"):
            if getattr(section, key) is None:
                raise ConfigError(f"{missing} no {key}; set it (see docs/data-efficiency.md)")
    return DifficultySchedule(where, section.min_difficulty, section.max_difficulty, section.schedule_type,
                              section.schedule_config)
