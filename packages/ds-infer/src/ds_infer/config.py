"""``init_inference`` settings with DeepSpeed's names, validated before any weight is touched.

DeepSpeed-Inference keys that change behaviour here: ``tensor_parallel`` (``{"tp_size": N}``; the
older top-level ``mp_size`` is read too), ``dtype``, ``checkpoint``, ``replace_with_kernel_inject``,
``max_out_tokens``, ``quant``, ``zero`` (ZeRO-Inference), ``moe`` (``ep_size``) and
``enable_cuda_graph``. Our additions: ``compile`` (capture the decode step: ahead of time with
AOTInductor, or with ``torch.compile``) and ``device``. DeepSpeed keys that only tune its own kernels are accepted and ignored
(:data:`ACCEPTED_WITHOUT_EFFECT`); anything else fails with the nearest valid key.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ds_core.errors import ConfigError, closest

__all__ = ["InferenceConfig", "TensorParallelConfig", "ZeroInferenceConfig", "MoEInferenceConfig", "parse_config",
           "parse_bytes", "ACCEPTED_WITHOUT_EFFECT"]

ACCEPTED_WITHOUT_EFFECT = ("triangular_masking", "return_tuple", "min_out_tokens", "use_triton",
                           "triton_autotune", "injection_policy", "injection_policy_tuple", "replace_method",
                           "training_mp_size", "set_empty_params", "save_mp_checkpoint_path", "base_dir",
                           "transposed_mode", "keep_module_on_host", "enable_qkvo_scales")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)


class TensorParallelConfig(_Section):
    enabled: bool = Field(True, description="Shard attention and MLP weights over tp_size ranks.")
    tp_size: int = Field(1, ge=1, description="Ranks sharing each layer (1: no tensor parallelism).")
    tp_group: Any = Field(None, description="Process group of the tensor-parallel ranks (default: world).")
    mpu: Any = Field(None, description="Accepted for compatibility; pass tp_group instead.")


class ZeroInferenceConfig(_Section):
    """ZeRO-Inference: weights kept off the compute device and streamed layer by layer."""

    offload: str = Field("none", description="Where the layer weights live: 'none', 'cpu' or 'nvme'.")
    nvme_path: str | None = Field(None, description="Directory for the weight files when offload is 'nvme'.")
    pin_memory: bool = Field(True, description="Page-locked host buffers (faster host→GPU copies).")
    prefetch: int = Field(1, ge=0, description="Layers fetched ahead of the one computing.")
    memory_budget: int | str | None = Field(
        None, description="Bytes of layer weights this process may hold resident (CPU-only runs), e.g. '64MB'.")
    stage: int | None = Field(None, description="DeepSpeed's spelling: 3 with offload_param.")
    offload_param: dict | None = Field(None, description="DeepSpeed's {'device': 'cpu'|'nvme', 'nvme_path': ...}.")

    @field_validator("offload")
    @classmethod
    def _offload(cls, v: str) -> str:
        if v not in ("none", "cpu", "nvme"):
            raise ValueError(f"offload {v!r} must be 'none', 'cpu' or 'nvme'")
        return v

    def resolved(self) -> ZeroInferenceConfig:
        """Fold DeepSpeed's ``offload_param`` spelling into ``offload``/``nvme_path``/``pin_memory``."""
        if self.offload_param:
            p = self.offload_param
            return self.model_copy(update=dict(offload=p.get("device", "cpu"),
                                               nvme_path=p.get("nvme_path", self.nvme_path),
                                               pin_memory=p.get("pin_memory", self.pin_memory),
                                               offload_param=None))
        return self


class MoEInferenceConfig(_Section):
    enabled: bool = Field(True, description="Expert-parallel inference for MoE models.")
    ep_size: int = Field(1, ge=1, description="Ranks the experts are spread over (the tensor-parallel ranks).")
    moe_experts: list[int] | int | None = Field(None, description="Accepted for compatibility.")
    type: str = Field("standard", description="Accepted for compatibility.")


class InferenceConfig(_Section):
    """What :func:`ds_infer.init_inference` accepts (see docs/inference.md for every key)."""

    tensor_parallel: TensorParallelConfig = Field(default_factory=TensorParallelConfig)
    dtype: Any = Field(None, description="torch.float32/bfloat16/float16, or torch.int8 for int8 weights.")
    checkpoint: Any = Field(None, description="A save_pretrained directory, a ds checkpoint directory, or "
                                              "DeepSpeed's {'type', 'checkpoints': [...]} description.")
    replace_with_kernel_inject: bool = Field(False, description="Use ds_infer's native fused model and "
                                                                "static-cache decode path.")
    max_out_tokens: int = Field(1024, ge=1, description="Longest prompt + generated sequence.")
    quant: Any = Field(None, description="Weight-only quantization: 'int8', 'int4', {'bits', 'group_size', "
                                         "'symmetric'}, or bitsandbytes {'backend': 'bnb', 'type': 'nf4'}.")
    zero: ZeroInferenceConfig = Field(default_factory=ZeroInferenceConfig)
    moe: MoEInferenceConfig | bool = Field(default_factory=MoEInferenceConfig)
    enable_cuda_graph: bool = Field(False, description="Capture the decode step in a CUDA graph.")
    compile: bool | dict = Field(False, description="Capture the decode step: True compiles it ahead of time "
                                                    "(AOTInductor) on CPU with one rank, torch.compile elsewhere; "
                                                    "a dict of torch.compile keyword arguments uses torch.compile.")
    device: str | None = Field(None, description="Where the model runs (default: cuda if available, else cpu).")
    mp_size: int | None = Field(None, description="DeepSpeed's older name for tensor_parallel.tp_size.")
    ep_size: int | None = Field(None, description="DeepSpeed's top-level ep_size.")

    def tp_size(self) -> int:
        if self.mp_size is not None and self.mp_size != 1:
            if self.tensor_parallel.tp_size not in (1, self.mp_size):
                raise ConfigError(f"mp_size {self.mp_size} and tensor_parallel.tp_size "
                                  f"{self.tensor_parallel.tp_size} disagree; keep tensor_parallel.tp_size")
            return self.mp_size
        return self.tensor_parallel.tp_size if self.tensor_parallel.enabled else 1


def parse_bytes(value: int | str | None) -> int | None:
    """``123``, ``"64MB"``, ``"1.5GiB"`` -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", str(value).lower())
    if not m:
        raise ConfigError(f"memory_budget {value!r} is not a size; write bytes (123) or e.g. '64MB', '2GiB'")
    number, unit = float(m.group(1)), m.group(2).rstrip("b").rstrip("i")
    return int(number * 1024 ** " kmgt".index(unit or " "))


def _check_keys(model: type[BaseModel], data: Any, path: str) -> None:
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown init_inference key {path}{key!r}{closest(key, fields)}; valid keys here: "
                              f"{', '.join(sorted(fields))}")
        annotation = fields[key].annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                _check_keys(candidate, value, f"{path}{key}.")


def parse_config(config: Any = None, **kwargs: Any) -> InferenceConfig:
    """Merge a config (dict, JSON string/path, or :class:`InferenceConfig`) with keyword overrides.

    A key given both ways with different values is an error (DeepSpeed's rule).
    """
    if isinstance(config, InferenceConfig):
        raw = config.model_dump(exclude_unset=True)
    elif config is None:
        raw = {}
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        from ds_core.config.loader import read_config

        raw, _ = read_config(config)
    for key, value in kwargs.items():
        if key in raw and raw[key] != value and not isinstance(value, torch.dtype):
            raise ConfigError(f"init_inference: {key!r} is {raw[key]!r} in the config and {value!r} as a keyword; "
                              "give it once")
        raw[key] = value
    for key in ACCEPTED_WITHOUT_EFFECT:
        raw.pop(key, None)
    if isinstance(raw.get("tensor_parallel"), int):
        raw["tensor_parallel"] = {"tp_size": raw["tensor_parallel"]}
    if isinstance(raw.get("moe"), bool):
        raw["moe"] = {"enabled": raw["moe"]}
    _check_keys(InferenceConfig, raw, "")
    try:
        return InferenceConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"init_inference {loc} = {err.get('input')!r} is invalid: {err['msg']}; see "
                          "docs/inference.md for the allowed values") from None
