"""The ``pipeline`` config section, with DeepSpeed's key names and defaults.

DeepSpeed reads partitioning, seeding and activation checkpointing from the ``PipelineModule``
arguments; its ``pipeline`` section mostly repeats them. We accept every key it documents so a
DeepSpeed config loads unchanged, and check the ones that would silently disagree with the module
(``stages``, ``partition_method``) when the engine is built.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ds_core.config.sections import Section

__all__ = ["PipelineConfig"]


class PipelineConfig(Section):
    """``pipeline``: pipeline-parallel options (GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2019)."""

    stages: int | Literal["auto"] = Field(
        "auto", description="Number of pipeline stages; 'auto' takes the PipelineModule's num_stages. "
                            "An integer must equal it.")
    partition: str = Field("best", description="DeepSpeed's legacy name for partition_method; 'best' "
                                               "means the module's choice.")
    partition_method: str | None = Field(
        None, description="'parameters', 'uniform' or 'type:<regex>'; when set it must equal the "
                          "PipelineModule's partition_method (layers are placed when the module is built).")
    seed_layers: bool = Field(False, description="Seed each layer's initialisation by its index "
                                                 "(PipelineModule(seed_layers=...) decides; accepted for compatibility).")
    seed_fn: str | None = Field(None, description="Accepted for compatibility; has no effect.")
    activation_checkpoint_interval: int = Field(
        0, ge=0, description="Checkpoint every N layers of a stage; a value > 0 overrides a module built with 0.")
    pipe_partitioned: bool = Field(True, description="Partition activations sent between stages over "
                                                     "tensor-parallel ranks; no effect without tensor parallelism.")
    grad_partitioned: bool = Field(True, description="Partition gradients sent between stages over "
                                                     "tensor-parallel ranks; no effect without tensor parallelism.")
    use_reentrant: bool = Field(False, description="Accepted for compatibility; checkpointing is always "
                                                   "non-reentrant.")

    @field_validator("stages")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"pipeline.stages {value} must be >= 1 or 'auto'")
        return value
