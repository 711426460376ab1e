"""The ``zero_optimization`` config section, with DeepSpeed's key names and defaults.

Stages 1, 2 and 3 of ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models") are implemented; stage 0 keeps the engine's plain data parallelism.
Every key DeepSpeed documents is accepted (so a DeepSpeed config loads unchanged). Keys that would
change behaviour we do not have (quantized or hierarchical partitioning) fail here, at config time,
with the fix — before any process group, buffer or file is touched. So does an NVMe offload
``nvme_path`` that is missing, not a directory or not writable (ZeRO-Infinity, Rajbhandari et al.
2021: optimizer state and parameters swapped to NVMe; see ``swap.py``).

Bucket sizes count elements, as in DeepSpeed; ``5e8`` written as a float is accepted, ``"auto"``
means the default.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ds_core.config.sections import Section

__all__ = ["ZeroConfig", "OffloadOptimizerConfig", "OffloadParamConfig", "DEFAULT_BUCKET_ELEMENTS",
           "STAGES_AVAILABLE"]

DEFAULT_BUCKET_ELEMENTS = 500_000_000
STAGES_AVAILABLE = (0, 1, 2, 3)
DEFAULT_SWAP_BUFFER_ELEMENTS = 100_000_000  # DeepSpeed's offload_param.buffer_size


def check_nvme_path(section: str, path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is an existing, writable directory (NVMe swap files go there)."""
    where = f"{section}.nvme_path {path!r}"
    if not os.path.exists(path):
        raise ValueError(f"{where} does not exist; NVMe offload keeps its swap files in an existing "
                         f"directory: create it (mkdir -p {path}) or point nvme_path to a directory on a "
                         f"local NVMe/SSD")
    if not os.path.isdir(path):
        raise ValueError(f"{where} is not a directory; nvme_path must name a directory (swap files go in "
                         f"<nvme_path>/ds_zero_swap/rank<r>/): point it to one, e.g. {os.path.dirname(path) or '.'!r}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{where} is not writable by this user; NVMe offload creates files there: fix its "
                         f"permissions (chmod u+w) or point nvme_path to a writable directory")


def _count(name: str, value: Any, default: int, allow_zero: bool = False) -> int:
    """An element count: int, integral float (``5e8``) or ``"auto"`` (= ``default``)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{name} {value!r} must be a whole number of elements (e.g. 5e8) or 'auto'")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} {value!r} must be > 0 elements; DeepSpeed's default is {default:.0e}")
    return int(value)


def _offload_device(value: Any) -> Any:
    """``None`` -> 'none'; names are case-insensitive; anything else is refused with the choices."""
    if value is None:
        return "none"
    if isinstance(value, str) and value.lower() not in ("none", "cpu", "nvme"):
        raise ValueError(f"offload device {value!r} is not one of 'none', 'cpu', 'nvme'")
    return value.lower() if isinstance(value, str) else value


class OffloadOptimizerConfig(Section):
    """``zero_optimization.offload_optimizer``: where master weights and optimizer state live (ZeRO-Offload)."""

    device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="'cpu' keeps fp32 master weights and optimizer state in host memory and steps "
                            "there; 'nvme' keeps them in files under nvme_path between steps and streams "
                            "them through host memory in sub-groups; 'none' keeps them on the accelerator.")
    nvme_path: str = Field("/local_nvme", description="Existing writable directory for NVMe offload (device "
                                                      "'nvme'); files go in <nvme_path>/ds_zero_swap/rank<r>/.")
    buffer_count: int = Field(4, gt=0, description="NVMe staging buffers: while one sub-group is stepped "
                                                   "the next is read and the previous written.")
    buffer_size: int | float = Field(DEFAULT_SWAP_BUFFER_ELEMENTS, description="Elements per NVMe staging "
                                     "buffer (a ds addition; DeepSpeed sizes them from sub_group_size). One "
                                     "buffer holds a sub-group's fp32 master and optimizer state, so a "
                                     "sub-group is at most buffer_size / (1 + state tensors) elements.")
    pin_memory: bool = Field(False, description="Page-lock the host buffers for faster device copies "
                                                "(only where the accelerator supports pinned memory).")
    pipeline_read: bool = Field(False, description="Overlap NVMe reads with the step (NVMe offload only).")
    pipeline_write: bool = Field(False, description="Overlap NVMe writes with the step (NVMe offload only).")
    fast_init: bool = Field(False, description="Fast NVMe optimizer initialisation (NVMe offload only).")
    ratio: float = Field(1.0, gt=0, le=1, description="Fraction of the optimizer step on the host; only 1.0 "
                                                        "(all of it) is implemented.")

    @field_validator("buffer_size")
    @classmethod
    def _buffer_size(cls, value: Any) -> int:
        return _count("offload_optimizer.buffer_size", value, DEFAULT_SWAP_BUFFER_ELEMENTS)

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        return _offload_device(value)


class OffloadParamConfig(Section):
    """``zero_optimization.offload_param``: where stage 3 keeps the parameter shards ('cpu': host memory)."""

    device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where stage 3 keeps the parameter shards between uses: 'cpu' in host memory, "
                            "'nvme' in files under nvme_path (read back when the module runs).")
    nvme_path: str = Field("/local_nvme", description="Existing writable directory for NVMe parameter offload; "
                                                      "files go in <nvme_path>/ds_zero_swap/rank<r>/.")
    buffer_count: int = Field(5, gt=0, description="Parameter shards held in host memory at once (NVMe).")
    buffer_size: int | float = Field(DEFAULT_SWAP_BUFFER_ELEMENTS, description="Elements per parameter "
                                     "buffer; every shard must fit in one (NVMe).")
    max_in_cpu: int | float = Field(1_000_000_000, ge=0, description="Accepted; the shards in host memory "
                                                                     "are bounded by buffer_count instead.")
    pin_memory: bool = Field(False, description="Page-lock the host parameter buffers.")

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        return _offload_device(value)

    @field_validator("buffer_size")
    @classmethod
    def _buffer_size(cls, value: Any) -> int:
        return _count("offload_param.buffer_size", value, DEFAULT_SWAP_BUFFER_ELEMENTS)


class ZeroConfig(Section):
    """``zero_optimization``: partition optimizer state (stage 1) and gradients (stage 2) over data ranks."""

    stage: int = Field(0, description="0: plain data parallelism; 1: partition fp32 master weights and "
                                      "optimizer state; 2: also partition gradients; 3: also partition the "
                                      "parameters, gathered around the modules that use them.")
    allgather_partitions: bool = Field(True, description="All-gather updated partitions into every rank's "
                                                         "model after the step (the only mode implemented).")
    allgather_bucket_size: int | float | str = Field(
        DEFAULT_BUCKET_ELEMENTS, description="Elements all-gathered at a time after the step.")
    overlap_comm: bool = Field(False, description="Stage 2: reduce gradient buckets asynchronously, "
                                                  "overlapping backward.")
    reduce_scatter: bool = Field(True, description="Stage 2: reduce each bucket only to the ranks that own "
                                                   "it; false all-reduces whole buckets (always done on "
                                                   "gloo, where it is faster).")
    reduce_bucket_size: int | float | str = Field(
        DEFAULT_BUCKET_ELEMENTS, description="Elements per gradient bucket (stage 1 all-reduce, stage 2 reduce, stage 3 "
                                            "reduce-scatter).")
    contiguous_gradients: bool = Field(True, description="Accepted: gradients are always copied into "
                                                         "contiguous buckets and partitions here.")
    round_robin_gradients: bool = Field(False, description="Accepted for compatibility (a DeepSpeed "
                                                           "offload-copy ordering); no effect.")
    load_from_fp32_weights: bool = Field(True, description="On load, restore fp32 master weights from the "
                                                           "checkpoint's partitions (else from the model's "
                                                           "16-bit weights).")
    elastic_checkpoint: bool = Field(False, description="Accepted: checkpoints always re-partition to any "
                                                        "data-parallel size on load.")
    grad_hooks: bool = Field(True, description="Accepted: gradients are always collected by hooks.")
    ignore_unused_parameters: bool = Field(True, description="Parameters without a gradient contribute "
                                                             "zeros (always allowed).")
    legacy_stage1: bool = Field(False, description="Accepted for compatibility; only false is implemented.")
    sub_group_size: int | float | str = Field(1_000_000_000, description="NVMe optimizer offload: elements "
                                                                         "stepped at a time (also bounded by "
                                                                         "offload_optimizer.buffer_size).")
    cpu_offload: bool | None = Field(None, description="Deprecated DeepSpeed spelling of "
                                                       "offload_optimizer.device 'cpu'.")
    cpu_offload_params: bool | None = Field(None, description="Deprecated spelling of offload_param (stage 3).")
    cpu_offload_use_pin_memory: bool | None = Field(None, description="Deprecated spelling of pin_memory.")
    offload_optimizer: OffloadOptimizerConfig = Field(default_factory=OffloadOptimizerConfig,
                                                      description="ZeRO-Offload of optimizer state.")
    offload_param: OffloadParamConfig = Field(default_factory=OffloadParamConfig,
                                              description="Stage-3 parameter offload: shards in host memory "
                                                          "or on NVMe.")
    # Stage-3 and later keys, accepted so DeepSpeed configs load; they act only with stage 3.
    stage3_max_live_parameters: int | float | str = Field(
        1_000_000_000, description="Stage 3: elements gathered or in flight above which no prefetch starts "
                                   "and finished parameters are released.")
    stage3_max_reuse_distance: int | float | str = Field(
        1_000_000_000, description="Stage 3: a parameter used again within this many elements of the "
                                   "recorded order stays gathered instead of being released.")
    stage3_prefetch_bucket_size: int | float | str = Field(
        50_000_000, description="Stage 3: elements of the recorded order gathered ahead of the running "
                                "module (0: no prefetch).")
    stage3_hang_timeout: float | None = Field(
        None, gt=0, description="Stage 3 (ds only): seconds a rank waits in a parameter gather for the other "
                                "ranks before failing with the module's name; None: the process group's timeout.")
    stage3_param_persistence_threshold: int | float | str = Field(
        100_000, description="Stage 3: parameters of at most this many elements stay whole on every rank "
                             "(their optimizer state is still partitioned).")
    stage3_model_persistence_threshold: int | float | str = Field(2**63 - 1, description="Stage 3 only.")
    stage3_gather_16bit_weights_on_model_save: bool = Field(
        False, description="Stage 3: also write the gathered model weights (model dtype) as one "
                           "consolidated model.safetensors when saving a checkpoint.")
    stage3_gather_fp16_weights_on_model_save: bool = Field(False, description="Old name of the key above.")
    stage3_module_granularity_threshold: int = Field(0, description="Stage 3 only.")
    memory_efficient_linear: bool = Field(True, description="Stage 3 only.")
    override_module_apply: bool = Field(True, description="Stage 3 only.")
    use_all_reduce_for_fetch_params: bool = Field(False, description="Stage 3 only.")
    log_trace_cache_warnings: bool = Field(False, description="Stage 3 only.")
    pipeline_loading_checkpoint: bool = Field(False, description="Stage 3 only.")
    zero_hpz_partition_size: int = Field(
        1, description="ZeRO++ hpZ (stage 3): after the forward gather each rank keeps a secondary shard over a "
                       "group of this many consecutive ranks, so backward re-gathers stay in that group; must "
                       "divide the data-parallel world size; 1 (or 0): off.")
    zero_quantized_weights: bool = Field(
        False, description="ZeRO++ qwZ (stage 3): parameter all-gathers send block-quantized int8 (fp32 scale "
                           "per 256 values), dequantized on arrival; shards and masters stay exact.")
    zero_quantized_nontrainable_weights: bool = Field(False, description="ZeRO++; only false.")
    zero_quantized_gradients: bool = Field(
        False, description="ZeRO++ qgZ (stage 3): gradient reduce-scatter as an all-to-all of int4 block-"
                           "quantized chunks (fp32 scale per 128 values), summed in fp32 by their owner.")
    mics_shard_size: int = Field(-1, description="MiCS sharding; only -1 (off).")
    mics_hierarchical_params_gather: bool = Field(False, description="MiCS; only false.")

    @field_validator("stage")
    @classmethod
    def _stage(cls, value: int) -> int:
        if value not in STAGES_AVAILABLE:
            raise ValueError(f"stage {value} is not a ZeRO stage; use 0, 1, 2 or 3")
        return value

    @field_validator("allgather_bucket_size", "reduce_bucket_size")
    @classmethod
    def _bucket(cls, value: Any, info) -> int:
        # reduce_bucket_size 0 (DeepSpeed allows it): every gradient is reduced on its own.
        return _count(info.field_name, value, DEFAULT_BUCKET_ELEMENTS,
                      allow_zero=info.field_name == "reduce_bucket_size")

    @field_validator("sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                     "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                     "stage3_model_persistence_threshold")
    @classmethod
    def _stage3_count(cls, value: Any, info) -> int:
        default = cls.model_fields[info.field_name].default
        return _count(info.field_name, value, default, allow_zero=True)

    @model_validator(mode="before")
    @classmethod
    def _deprecated_cpu_offload(cls, data: Any) -> Any:
        # DeepSpeed's old ``cpu_offload: true`` means ``offload_optimizer: {device: cpu}``.
        if isinstance(data, dict) and data.get("cpu_offload") and "offload_optimizer" not in data:
            data = dict(data, offload_optimizer={"device": "cpu",
                                                 "pin_memory": bool(data.get("cpu_offload_use_pin_memory"))})
        if isinstance(data, dict) and data.get("cpu_offload_params") and "offload_param" not in data:
            data = dict(data, offload_param={"device": "cpu",
                                             "pin_memory": bool(data.get("cpu_offload_use_pin_memory"))})
        return data

    @model_validator(mode="after")
    def _rules(self) -> ZeroConfig:
        off = self.offload_optimizer
        if off.device != "none" and self.stage == 0:
            raise ValueError(f"offload_optimizer.device {off.device!r} needs stage 1 or 2 (or 3): the offloaded "
                             f"state is the partitioned optimizer state; set stage to 1, 2 or 3, or device to "
                             f"'none'")
        if off.ratio != 1.0:
            raise ValueError(f"offload_optimizer.ratio {off.ratio} is not implemented (only 1.0: the whole "
                             f"step on the host); remove ratio")
        par = self.offload_param.device
        if par != "none" and self.stage != 3:
            raise ValueError(f"offload_param.device {par!r} needs stage 3 (only there are parameters "
                             f"partitioned); set stage to 3 or remove offload_param")
        if par != "none" and off.device == "none":
            raise ValueError(f"offload_param.device {par!r} needs offload_optimizer.device 'cpu' too (or 'nvme'): "
                             f"the host shards are what the host optimizer steps, as in DeepSpeed; add "
                             f"\"offload_optimizer\": {{\"device\": \"{par}\"}}")
        if off.device == "nvme":
            check_nvme_path("offload_optimizer", off.nvme_path)
        if par == "nvme":
            check_nvme_path("offload_param", self.offload_param.nvme_path)
        zeropp = {"zero_quantized_weights": self.zero_quantized_weights,
                  "zero_quantized_gradients": self.zero_quantized_gradients,
                  "zero_hpz_partition_size": self.zero_hpz_partition_size not in (0, 1)}
        for key, on in zeropp.items():
            if on and self.stage != 3:
                raise ValueError(f"{key} {getattr(self, key)!r} needs stage 3 (ZeRO++ works on partitioned "
                                 f"parameters) but stage is {self.stage}; set stage to 3 or remove {key}")
        if self.zero_hpz_partition_size < 0:
            raise ValueError(f"zero_hpz_partition_size {self.zero_hpz_partition_size} is negative; set it to a "
                             f"divisor of the data-parallel world size (e.g. the GPUs per node), or 1 for off")
        unavailable = {"zero_quantized_nontrainable_weights": (self.zero_quantized_nontrainable_weights, False),
                       "mics_shard_size": (self.mics_shard_size, -1),
                       "legacy_stage1": (self.legacy_stage1, False),
                       "allgather_partitions": (self.allgather_partitions, True)}
        for key, (value, default) in unavailable.items():
            if value != default:
                raise ValueError(f"{key} {value!r} is not implemented in ds-zero; remove it or set it to "
                                 f"{default!r}")
        return self

    @property
    def offload(self) -> bool:
        """True when the optimizer step runs on the host (``offload_optimizer.device`` 'cpu' or 'nvme')."""
        return self.offload_optimizer.device in ("cpu", "nvme")
