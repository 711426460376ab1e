"""The ``tensor_parallel`` config section (DeepSpeed's AutoTP training keys), owned by ds-parallel.

```json
"tensor_parallel": {"autotp_size": 2,
                    "partition_config": {"layer_specs": [{"patterns": [".*\\\\.down_proj\\\\.weight$"],
                                                          "partition_type": "row"}]}}
```
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

from pydantic import Field, field_validator

from ds_core.config import Section
from ds_core.errors import ConfigError

__all__ = ["TensorParallelConfig", "TPConfig", "LayerSpec", "PartitionConfig", "PRESETS"]

PRESETS = ("llama", "bloom", "chatglm", "mixtral", "deepseek_v2", "qwen2", "phi3")


class TPConfig(Section):
    """DeepSpeed's inner ``tp`` block (its ``tp_size`` mirrors ``autotp_size``)."""

    tp_size: int = Field(1, ge=1, description="Tensor-parallel size (use autotp_size).")
    tp_grain_size: int = Field(1, ge=1, description="Accepted for compatibility (uneven shards are not used).")


class LayerSpec(Section):
    """One rule of ``partition_config``: parameters whose names match ``patterns`` (regular
    expressions, e.g. ``.*\\.o_proj\\.weight$``) are split as ``partition_type``."""

    patterns: list[str] = Field(description="Regular expressions over parameter names (re.match).")
    partition_type: Literal["row", "column", "skip"] = Field(description="row, column or skip (replicate).")
    shape: list[int] | None = Field(None, description="A fused weight's sub-shape, e.g. [2, -1]: two parts.")
    partition_dim: int | None = Field(None, description="Accepted for compatibility (the weight's own layout decides).")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a regular expression: {exc}") from None
        return patterns


class PartitionConfig(Section):
    use_default_specs: bool = Field(True, description="Start from the found plan (else only these rules).")
    layer_specs: list[LayerSpec] = Field(default_factory=list, description="Rules, applied in order.")


class TensorParallelConfig(Section):
    """AutoTP training: shard the model over ``autotp_size`` ranks inside ``initialize``."""

    autotp_size: int = Field(0, ge=0, description="Tensor-parallel size; 0 or 1 disables.")
    partition_config: PartitionConfig | None = Field(None, description="Layer rules by parameter-name regex.")
    overrides: dict[str, str] = Field(default_factory=dict,
                                      description="Module-name patterns ('*' = any layer) to style names.")
    vocab_parallel_head: bool = Field(False, description="Keep the output head's logits split over the vocabulary.")
    shard_embeddings: bool = Field(True, description="Split the token embedding and output head over the vocabulary.")
    preset_model: str | None = Field(None, description="Accepted; the model's family is found from its structure.")
    tp_overlap_comm: bool = Field(False, description="Accepted for compatibility; no effect.")
    tp: TPConfig = Field(default_factory=TPConfig, alias="tensor_parallel", description="DeepSpeed's inner block.")
    dtype: str | None = Field(None, description="Accepted; precision comes from the fp16/bf16 sections.")
    keep_module_on_host: bool = Field(False, description="Accepted for compatibility; no effect.")
    replace_with_kernel_inject: bool = Field(False, alias="kernel_inject", description="Accepted; no effect.")
    injection_policy_tuple: Any = Field(None, description="Accepted for compatibility; no effect.")

    @field_validator("preset_model")
    @classmethod
    def _preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"preset_model {value!r} is not one of {', '.join(PRESETS)}")
        return value

    @property
    def size(self) -> int:
        """The tensor-parallel size asked for (1 when disabled)."""
        if self.autotp_size > 1 and self.tp.tp_size > 1 and self.tp.tp_size != self.autotp_size:
            raise ConfigError(f"tensor_parallel.autotp_size={self.autotp_size} but tensor_parallel.tp.tp_size="
                              f"{self.tp.tp_size}; set one of them")
        return max(1, self.autotp_size, self.tp.tp_size)

    def ds_axes(self) -> dict[str, int]:
        """The topology axes this section asks ``ds_core.initialize`` for (``{"tensor": autotp_size}``)."""
        return {"tensor": self.size} if self.size > 1 else {}

    def warn_unused(self) -> None:
        for key in ("tp_overlap_comm", "keep_module_on_host", "replace_with_kernel_inject"):
            if getattr(self, key):
                warnings.warn(f"tensor_parallel.{key} is accepted for DeepSpeed compatibility but has no effect "
                              f"in ds", UserWarning, stacklevel=3)
        if self.injection_policy_tuple is not None:
            warnings.warn("tensor_parallel.injection_policy_tuple has no effect in ds: the plan comes from the "
                          "model's tp_plan or structure; use partition_config or overrides", UserWarning, stacklevel=3)

    def overrides_for(self, module_names: list[str]) -> tuple[dict[str, str], bool]:
        """Module-name overrides from ``partition_config`` and ``overrides``; and whether to keep the
        found plan for modules no rule names (``use_default_specs``)."""
        out: dict[str, str] = {}
        keep = True
        if self.partition_config is not None:
            keep = self.partition_config.use_default_specs
            for spec in self.partition_config.layer_specs:
                style = {"row": "rowwise", "column": "colwise", "skip": "replicate"}[spec.partition_type]
                if spec.partition_type == "column" and spec.shape and spec.shape[0] == 2:
                    style = "packed_colwise"
                hits = 0
                for name in module_names:
                    if any(re.match(p, f"{name}.weight") or re.match(p, name) for p in spec.patterns):
                        out[name] = style
                        hits += 1
                if hits == 0:
                    raise ConfigError(f"tensor_parallel.partition_config rule {spec.patterns} matches no parameter "
                                      f"of the model (names look like {', '.join(n + '.weight' for n in module_names[:2])}"
                                      f", ...); fix the pattern")
        out.update(self.overrides)
        return out, keep
