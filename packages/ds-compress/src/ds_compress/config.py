"""The ``compression_training`` config section, with DeepSpeed's keys and defaults.

Each method (``weight_quantization``, ``activation_quantization``, ``sparse_pruning``,
``row_pruning``, ``head_pruning``, ``channel_pruning``) has ``shared_parameters`` (``enabled``,
``schedule_offset``, the method's settings) and ``different_groups``: named groups, each with
``params``, ``modules`` (regular expressions searched in module names; ``"*"``: every module) and,
for the structured pruning methods, ``related_modules`` (the layers whose inputs shrink with the
pruned layer's outputs). ``layer_reduction`` builds a shallower student from chosen teacher layers.
Defaults follow DeepSpeed's code (where its documentation differs, its code is what ran).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ds_core.config.sections import Section

__all__ = [
    "CompressionTrainingConfig",
    "WeightQuantization",
    "ActivationQuantization",
    "SparsePruning",
    "RowPruning",
    "HeadPruning",
    "ChannelPruning",
    "LayerReduction",
    "parse_compression_config",
]

QuantType = Literal["symmetric", "asymmetric"]


class Mixed16(Section):
    enabled: bool = Field(False, description="Blend fp and quantized weights, moving to fully quantized.")
    quantize_change_ratio: float = Field(0.001, ge=0, le=1, description="Per-step increase of the quantized share.")


class WeightQuantShared(Section):
    enabled: bool = Field(False, description="Quantize the weights of the groups' modules (QAT, straight-through).")
    quantizer_kernel: bool = Field(False, description="Accepted for compatibility; the shared quantizer is used.")
    schedule_offset: int = Field(0, ge=0, description="Training step at which quantization starts.")
    quantize_groups: int = Field(1, ge=1, description="Scales per weight matrix (split along rows, then along inputs).")
    quantize_verbose: bool = Field(False, description="Log bit-width changes.")
    quantization_type: QuantType = Field("symmetric", description="symmetric (no zero point) or asymmetric.")
    rounding: Literal["nearest", "stochastic"] = Field("nearest", description="Rounding of the quantizer.")
    quantize_weight_in_forward: bool = Field(False, description="DeepSpeed's switch between optimizer-side and "
                                             "forward-side quantization; both are forward-side here (identical "
                                             "results: gradients at the quantized weights reach the fp weights).")
    fp16_mixed_quantize: Mixed16 = Field(default_factory=Mixed16, description="Gradual switch to quantized weights.")


class WeightQuantParams(Section):
    start_bits: int = Field(8, ge=1, le=16, description="Bits when quantization starts.")
    target_bits: int = Field(8, ge=1, le=8, description="Final bits (<= start_bits).")
    quantization_period: int = Field(1, ge=0, description="Steps until the first one-bit reduction; the period doubles "
                                     "after each; 0 quantizes at target_bits from the start (DeepSpeed's examples use it).")

    @model_validator(mode="after")
    def _order(self):
        if self.target_bits > self.start_bits:
            raise ValueError(f"target_bits {self.target_bits} > start_bits {self.start_bits}; bits only decrease")
        return self


class ActivationQuantShared(Section):
    enabled: bool = Field(False, description="Quantize the inputs of the groups' modules.")
    quantization_type: QuantType = Field("symmetric", description="symmetric or asymmetric.")
    range_calibration: Literal["dynamic", "static"] = Field("dynamic", description="dynamic: per token; static: "
                                                           "one range per layer, a momentum (0.95) average of "
                                                           "training min/max.")
    schedule_offset: int = Field(1000, ge=0, description="Training step at which activation quantization starts.")


class ActivationQuantParams(Section):
    bits: int = Field(8, description="Activation bits, 4 or 8.")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v not in (4, 8):
            raise ValueError(f"activation bits {v} must be 4 or 8")
        return v


class PruneParams(Section):
    dense_ratio: float = Field(0.5, gt=0, le=1, description="Fraction of weights (rows, heads, channels) kept.")


class SparseShared(Section):
    enabled: bool = False
    schedule_offset: int = Field(1000, ge=0, description="Step at which pruning starts.")
    schedule_offset_end: int | None = Field(None, ge=0, description="snip_momentum: step at which the target "
                                            "sparsity is reached (default: schedule_offset).")
    schedule_offset_stride: int = Field(1, ge=1, description="snip_momentum: steps between mask updates.")
    method: Literal["l1", "topk", "snip_momentum"] = Field("l1", description="l1: magnitude, fixed when pruning "
                                                           "starts; topk: learned scores; snip_momentum: |w * grad| "
                                                           "with momentum, pruned gradually in blocks.")
    block_pattern: str = Field("4x1", description="snip_momentum blocks: 'NxM' (N rows x M inputs) or 'N:M'.")
    dense_ratio: float = Field(0.1, gt=0, le=1, description="snip_momentum target density (kept fraction).")
    excluded_modules: list[str] = Field(default_factory=list, description="snip_momentum: modules never pruned.")

    @field_validator("block_pattern")
    @classmethod
    def _pattern(cls, v):
        if not re.fullmatch(r"\d+x\d+|\d+:\d+", v):
            raise ValueError(f"block_pattern {v!r} must look like '4x1' (N rows x M inputs) or '2:4' (N of M)")
        return v

    @model_validator(mode="after")
    def _end(self):
        if self.schedule_offset_end is not None and self.schedule_offset_end < self.schedule_offset:
            raise ValueError(f"schedule_offset_end {self.schedule_offset_end} < schedule_offset {self.schedule_offset}")
        return self


class RowShared(Section):
    enabled: bool = False
    schedule_offset: int = Field(1000, ge=0)
    method: Literal["l1", "topk"] = "l1"


class HeadShared(Section):
    enabled: bool = False
    schedule_offset: int = Field(1000, ge=0)
    method: Literal["topk", "l1"] = "topk"
    num_heads: int | None = Field(None, ge=1, description="Attention heads of the pruned output projection.")

    @model_validator(mode="after")
    def _heads(self):
        if self.enabled and self.num_heads is None:
            raise ValueError("head_pruning needs shared_parameters.num_heads (the model's attention heads)")
        return self


class ChannelShared(Section):
    enabled: bool = False
    schedule_offset: int = Field(1000, ge=0)
    method: Literal["l1", "topk"] = "l1"


def _group(params_model):
    class Group(Section):
        params: params_model = Field(default_factory=params_model)
        modules: list[str] = Field(default_factory=lambda: ["*"], description="Regular expressions of module names.")
        related_modules: list[list[str]] | None = Field(None, description="Per entry of modules: related layers.")

        @model_validator(mode="after")
        def _related(self):
            if self.related_modules is not None and len(self.related_modules) != len(self.modules):
                raise ValueError(f"related_modules has {len(self.related_modules)} lists for {len(self.modules)} "
                                 f"modules entries; give one list per entry")
            return self

    Group.__name__ = f"{params_model.__name__}Group"
    return Group


WeightGroup = _group(WeightQuantParams)
ActivationGroup = _group(ActivationQuantParams)
PruneGroup = _group(PruneParams)


class _Method(Section):
    """[Note: groups typed as dict[str, Any]] ``different_groups`` is validated here, group by group,
    rather than by its annotation: a name-keyed dict of models is not something the config loader's
    nested unknown-key check walks (it would read the group names as keys of the group model)."""

    group_model: ClassVar[type]

    @field_validator("different_groups", mode="after", check_fields=False)
    @classmethod
    def _validate_groups(cls, groups: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, group in groups.items():
            if isinstance(group, cls.group_model):
                out[name] = group
                continue
            try:
                out[name] = cls.group_model.model_validate(group)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in (name, *err["loc"]))
                if err["type"] == "extra_forbidden":
                    raise ValueError(f"different_groups.{loc}: unknown key; a group has params, modules and "
                                     f"related_modules") from None
                raise ValueError(f"different_groups.{loc} = {err.get('input')!r}: {err['msg']}") from None
        return out

    @model_validator(mode="after")
    def _groups(self):
        shared = self.shared_parameters
        if shared.enabled and not self.different_groups and getattr(shared, "method", None) != "snip_momentum":
            raise ValueError("enabled but different_groups is empty; add at least one group with modules")
        return self


class WeightQuantization(_Method):
    shared_parameters: WeightQuantShared = Field(default_factory=WeightQuantShared)
    group_model: ClassVar[type] = WeightGroup
    different_groups: dict[str, Any] = Field(default_factory=dict)


class ActivationQuantization(_Method):
    shared_parameters: ActivationQuantShared = Field(default_factory=ActivationQuantShared)
    group_model: ClassVar[type] = ActivationGroup
    different_groups: dict[str, Any] = Field(default_factory=dict)


class SparsePruning(_Method):
    shared_parameters: SparseShared = Field(default_factory=SparseShared)
    group_model: ClassVar[type] = PruneGroup
    different_groups: dict[str, Any] = Field(default_factory=dict)


class RowPruning(_Method):
    shared_parameters: RowShared = Field(default_factory=RowShared)
    group_model: ClassVar[type] = PruneGroup
    different_groups: dict[str, Any] = Field(default_factory=dict)


class HeadPruning(_Method):
    shared_parameters: HeadShared = Field(default_factory=HeadShared)
    group_model: ClassVar[type] = PruneGroup
    different_groups: dict[str, Any] = Field(default_factory=dict)


class ChannelPruning(_Method):
    shared_parameters: ChannelShared = Field(default_factory=ChannelShared)
    group_model: ClassVar[type] = PruneGroup
    different_groups: dict[str, Any] = Field(default_factory=dict)


class LayerReduction(Section):
    enabled: bool = False
    keep_number_layer: int | None = Field(None, ge=1, description="Layers of the student.")
    module_name_prefix: str = Field("", description="Name of the layer list, e.g. 'bert.encoder.layer'.")
    teacher_layer: list[int] = Field(default_factory=list, description="Teacher layer copied into each student layer.")
    other_module_name: list[str] = Field(default_factory=list, description="Other modules copied from the teacher.")

    @model_validator(mode="after")
    def _layers(self):
        if not self.enabled:
            return self
        if not self.module_name_prefix:
            raise ValueError("layer_reduction needs module_name_prefix (the layer list, e.g. 'bert.encoder.layer')")
        if self.keep_number_layer is None:
            self.keep_number_layer = len(self.teacher_layer)
        if len(self.teacher_layer) != self.keep_number_layer:
            raise ValueError(f"teacher_layer has {len(self.teacher_layer)} entries but keep_number_layer is "
                             f"{self.keep_number_layer}; name one teacher layer per student layer")
        return self


class CompressionTrainingConfig(Section):
    """``compression_training``: DeepSpeed's compression methods, each off unless ``enabled``."""

    weight_quantization: WeightQuantization = Field(default_factory=WeightQuantization)
    activation_quantization: ActivationQuantization = Field(default_factory=ActivationQuantization)
    sparse_pruning: SparsePruning = Field(default_factory=SparsePruning)
    row_pruning: RowPruning = Field(default_factory=RowPruning)
    head_pruning: HeadPruning = Field(default_factory=HeadPruning)
    channel_pruning: ChannelPruning = Field(default_factory=ChannelPruning)
    layer_reduction: LayerReduction = Field(default_factory=LayerReduction)


def parse_compression_config(config: Any) -> CompressionTrainingConfig:
    """Accept a DeepSpeed config (dict, JSON string, path, a ds_core config) or the section itself."""
    from ds_core.config.loader import read_config

    if isinstance(config, CompressionTrainingConfig):
        return config
    section = getattr(config, "section", None)
    if callable(section):  # a parsed ds_core config
        value = section("compression_training")
        return value if isinstance(value, CompressionTrainingConfig) else parse_compression_config(
            {"compression_training": value or {}})
    raw, _ = read_config(config) if not isinstance(config, dict) else (config, "")
    body = raw.get("compression_training", raw if not raw or set(raw) <= set(CompressionTrainingConfig.model_fields) else None)
    if body is None:
        from .errors import CompressionError

        raise CompressionError("the config has no 'compression_training' section; add one (see docs/compression.md)")
    return validate_section(body)


def validate_section(body: Any) -> CompressionTrainingConfig:
    """Validate the section's dict; errors name the key path, the rule and (for typos) the nearest key."""
    from pydantic import BaseModel, ValidationError

    from ds_core.errors import closest

    from .errors import CompressionError

    try:
        return CompressionTrainingConfig.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in ("compression_training", *err["loc"]))
        if err["type"] == "extra_forbidden":
            model: Any = CompressionTrainingConfig
            for part in err["loc"][:-1]:
                field = model.model_fields.get(str(part)) if isinstance(model, type) else None
                if field is None:
                    model = None
                    break
                ann = field.annotation
                args = getattr(ann, "__args__", (ann,))
                model = next((a for a in args[::-1] if isinstance(a, type) and issubclass(a, BaseModel)), None)
                if model is None:
                    break
            valid = set(model.model_fields) if model is not None else set()
            hint = closest(str(err["loc"][-1]), valid)
            raise CompressionError(f"unknown config key {loc!r}{hint}; valid keys here: "
                                   f"{', '.join(sorted(valid)) or 'see docs/compression.md'}") from None
        raise CompressionError(f"config value {loc} = {err.get('input')!r} is invalid: {err['msg']}; see "
                               f"docs/compression.md for the allowed values") from None
