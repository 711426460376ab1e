"""Activation checkpointing with DeepSpeed's surface (``deepspeed.checkpointing``).

``checkpoint(function, *args)`` runs ``function`` without keeping its intermediate activations and
recomputes them in backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
It is ``torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=True)``: the
recompute replays the CPU and device RNG state of the forward, so dropout masks are identical and
gradients match the plain run exactly.

The only tensors a checkpointed region keeps for backward are its inputs. PyTorch saves them
through the saved-tensor hooks that are active around the call, so the DeepSpeed options are
pack/unpack hooks on exactly those tensors:

- ``partition_activations``: each tensor-parallel rank keeps 1/t of every saved input and the
  full tensor is all-gathered when backward needs it (Megatron-LM's activation partitioning,
  Korthikanti et al. 2022). It needs a tensor-parallel group (``mpu_``: a ds ``Topology`` with
  ``tensor > 1`` or a Megatron-style mpu); with tensor size 1 or no ``mpu_`` it does nothing.
- ``cpu_checkpointing``: saved inputs are copied to host memory (pinned when the accelerator
  supports it) and brought back in backward. On a CPU run they already are in host memory, so it
  does nothing.
- ``contiguous_memory_optimization`` + ``number_checkpoints``: saved inputs are copied into slots
  of one preallocated tensor per (device, dtype, size) with ``number_checkpoints`` slots, reused
  every step, so the long-lived checkpoints do not fragment the device allocator between the
  short-lived activations. A slot is freed when the graph that saved it is freed. CPU runs skip it:
  the host allocator has no such fragmentation to avoid, and the copy would only cost time.
- ``synchronize_checkpoint_boundary``: synchronize the accelerator before the forward and the
  recompute of every region. ``profile``: time them with :class:`~ds_core.monitor.timers.Timers`
  under ``checkpoint_forward`` and ``checkpoint_recompute`` (read with :func:`get_timers`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from pydantic import ValidationError

from .config.sections import ActivationCheckpointingConfig
from .errors import ConfigError, closest

__all__ = [
    "checkpoint",
    "configure",
    "is_configured",
    "reset",
    "settings",
    "get_timers",
    "ContiguousActivationBuffer",
    "FORWARD_TIMER",
    "RECOMPUTE_TIMER",
]

FORWARD_TIMER = "checkpoint_forward"
RECOMPUTE_TIMER = "checkpoint_recompute"

# configure() keyword -> section field (DeepSpeed's two spellings of each option).
_KWARGS = {
    "partition_activations": "partition_activations",
    "contiguous_checkpointing": "contiguous_memory_optimization",
    "num_checkpoints": "number_checkpoints",
    "checkpoint_in_cpu": "cpu_checkpointing",
    "synchronize": "synchronize_checkpoint_boundary",
    "profile": "profile",
}


@dataclass
class _TensorParallel:
    size: int
    rank: int
    group: Any


class _State:
    def __init__(self) -> None:
        self.config = ActivationCheckpointingConfig()
        self.configured = False
        self.mpu: Any = None
        self.tensor_parallel: _TensorParallel | None = None  # resolved on first use
        self.buffers: dict[tuple[str, bool], ContiguousActivationBuffer] = {}
        self.timers: Any = None


_state = _State()


# -- configuration -----------------------------------------------------------------------------------

def _validation_error(exc: ValidationError, where: str) -> ConfigError:
    fields = list(ActivationCheckpointingConfig.model_fields)
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        hint = closest(key, fields) if err["type"] == "extra_forbidden" else ""
        problems.append(f"{key}={err.get('input')!r}: {err['msg']}{hint}")
    return ConfigError(f"activation_checkpointing ({where}): " + "; ".join(problems))


def _section_from(source: Any) -> ActivationCheckpointingConfig:
    """The section out of a DSConfig, a full or section-only dict, a JSON path/string, or itself."""
    if source is None:
        return ActivationCheckpointingConfig()
    if isinstance(source, ActivationCheckpointingConfig):
        return source
    section = getattr(source, "activation_checkpointing", None)
    if isinstance(section, ActivationCheckpointingConfig):
        return section
    if isinstance(source, (str, os.PathLike)):
        from .config.loader import read_config

        source, _ = read_config(source)
    if isinstance(source, Mapping):
        from .config.model import DSConfig

        if "activation_checkpointing" in source or any(k in DSConfig.model_fields for k in source):
            where, data = "config", source.get("activation_checkpointing") or {}
        else:
            where, data = "section dict", source
        try:
            return ActivationCheckpointingConfig.model_validate(dict(data))
        except ValidationError as exc:
            raise _validation_error(exc, where) from None
    raise ConfigError(
        f"deepspeed_config={source!r} is not a config; pass a DSConfig, a config dict, the "
        f"activation_checkpointing dict, an ActivationCheckpointingConfig or a JSON path"
    )


def configure(mpu_: Any = None, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """Set the options for every later :func:`checkpoint` call in this process.

    ``deepspeed_config`` gives the ``activation_checkpointing`` section; a keyword that is not
    ``None`` overrides its field. ``mpu_`` supplies the tensor-parallel group for
    ``partition_activations``: a :class:`ds_core.comm.Topology` (its ``tensor`` axis) or an object
    with Megatron's ``get_(tensor_)model_parallel_{world_size,rank,group}``.
    """
    values = _section_from(deepspeed_config).model_dump()
    given = dict(partition_activations=partition_activations, contiguous_checkpointing=contiguous_checkpointing,
                 num_checkpoints=num_checkpoints, checkpoint_in_cpu=checkpoint_in_cpu,
                 synchronize=synchronize, profile=profile)
    for key, value in given.items():
        if value is None:
            continue
        if key == "num_checkpoints":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"num_checkpoints={value!r} must be an int (checkpointed layers per forward)")
        elif not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be True or False")
        values[_KWARGS[key]] = value

    n = values["number_checkpoints"]
    if n is not None and n <= 0:
        raise ConfigError(
            f"number_checkpoints={n} must be > 0; set it to the number of checkpointed layers in "
            f"one forward, or leave it unset"
        )
    if values["contiguous_memory_optimization"] and n is None:
        raise ConfigError(
            "contiguous_memory_optimization is true but number_checkpoints is not set; the buffer "
            "has one slot per checkpointed layer, so set number_checkpoints to that count"
        )
    _check_mpu(mpu_)
    if values["partition_activations"] and mpu_ is None:
        warnings.warn(
            "partition_activations is true but no tensor-parallel group was given (mpu_=None), so "
            "activations are not partitioned; pass mpu_=<Topology with tensor > 1>",
            stacklevel=2,
        )
    reset()
    _state.config = ActivationCheckpointingConfig(**values)
    _state.mpu = mpu_
    _state.tensor_parallel = None
    _state.configured = True


def is_configured() -> bool:
    """True once :func:`configure` has run (and :func:`reset` has not undone it with ``config=True``)."""
    return _state.configured


def settings() -> ActivationCheckpointingConfig:
    """The options in effect (defaults until :func:`configure`)."""
    return _state.config


def reset(*, config: bool = False) -> None:
    """Free the contiguous buffers and profiling timers (DeepSpeed's ``reset``).

    ``config=True`` also forgets :func:`configure`, back to the defaults.
    """
    _state.buffers.clear()
    _state.timers = None
    if config:
        _state.config = ActivationCheckpointingConfig()
        _state.mpu = None
        _state.tensor_parallel = None
        _state.configured = False


def get_timers():
    """The profiling :class:`~ds_core.monitor.timers.Timers` (created when ``profile`` is on)."""
    if _state.timers is None:
        from .monitor.timers import Timers

        _state.timers = Timers()
    return _state.timers


# -- tensor-parallel group ---------------------------------------------------------------------------

def _is_topology(mpu: Any) -> bool:
    return hasattr(mpu, "sizes") and callable(getattr(mpu, "group", None))


def _mpu_prefix(mpu: Any) -> str | None:
    for prefix in ("get_tensor_model_parallel_", "get_model_parallel_"):
        if all(callable(getattr(mpu, prefix + part, None)) for part in ("world_size", "rank", "group")):
            return prefix
    return None


def _check_mpu(mpu: Any) -> None:
    if mpu is not None and not _is_topology(mpu) and _mpu_prefix(mpu) is None:
        raise ConfigError(
            f"mpu_={mpu!r} gives no tensor-parallel group; pass a ds_core.comm.Topology or an "
            f"object with get_model_parallel_world_size/rank/group (or the get_tensor_model_parallel_ "
            f"spelling)"
        )


def _resolve_tensor_parallel(mpu: Any) -> _TensorParallel:
    if mpu is None:
        return _TensorParallel(1, 0, None)
    if _is_topology(mpu):  # ds_core.comm.Topology
        size = mpu.size("tensor")
        if size == 1:
            return _TensorParallel(1, 0, None)
        return _TensorParallel(size, mpu.rank("tensor"), mpu.group("tensor"))
    _check_mpu(mpu)
    prefix = _mpu_prefix(mpu)
    size = int(getattr(mpu, prefix + "world_size")())
    if size == 1:
        return _TensorParallel(1, 0, None)
    return _TensorParallel(size, int(getattr(mpu, prefix + "rank")()), getattr(mpu, prefix + "group")())


# -- contiguous buffer -------------------------------------------------------------------------------

class _Pool:
    def __init__(self, slots: int, numel: int, dtype: torch.dtype, device: torch.device, pin: bool) -> None:
        self.data = torch.empty(slots, numel, dtype=dtype, device=device, pin_memory=pin)
        self.free = list(range(slots - 1, -1, -1))


class _Slot:
    """A claim on one row of a pool; the row returns to the pool when this object is freed."""

    def __init__(self, pool: _Pool, index: int) -> None:
        self.tensor = pool.data[index]
        weakref.finalize(self, pool.free.append, index)


class ContiguousActivationBuffer:
    """Rows of preallocated tensors, one tensor per (dtype, size), ``slots`` rows each.

    :meth:`store` copies a tensor into a free row; the row is reused once the returned slot object
    is garbage (its autograd graph was freed), so the same memory serves every step.
    """

    def __init__(self, slots: int, device: torch.device | str, pin_memory: bool = False) -> None:
        if slots < 1:
            raise ConfigError(f"number_checkpoints={slots} must be > 0")
        self.slots = slots
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        self._pools: dict[tuple[torch.dtype, int], _Pool] = {}

    def store(self, tensor: torch.Tensor) -> _Slot:
        key = (tensor.dtype, tensor.numel())
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self.slots, tensor.numel(), tensor.dtype, self.device, self.pin_memory)
        if not pool.free:
            raise ConfigError(
                f"number_checkpoints={self.slots} is too small: more than {self.slots} checkpointed "
                f"inputs of {tensor.numel()} {tensor.dtype} elements are alive at once; raise "
                f"number_checkpoints to the number of checkpointed layers per forward (or call "
                f"ds_core.activation_checkpointing.reset() between forwards that run no backward)"
            )
        slot = _Slot(pool, pool.free.pop())
        slot.tensor.copy_(tensor.reshape(-1), non_blocking=self.pin_memory)
        return slot

    def bytes_allocated(self) -> int:
        return sum(p.data.numel() * p.data.element_size() for p in self._pools.values())


# -- the saved-input hooks ---------------------------------------------------------------------------

class _InputStore:
    """Pack/unpack hooks applied to the inputs a checkpointed region saves for backward."""

    def __init__(self, offload: bool, buffer: ContiguousActivationBuffer | None,
                 tensor_parallel: _TensorParallel | None) -> None:
        self.offload = offload
        self.buffer = buffer
        self.tp = tensor_parallel

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.numel() == 0 or isinstance(tensor, torch.nn.Parameter):
            return tensor
        data = tensor.detach()
        padded = None
        if self.tp is not None:
            per = math.ceil(data.numel() / self.tp.size)
            flat = data.reshape(-1)
            chunk = flat[self.tp.rank * per:(self.tp.rank + 1) * per]
            padded = per
            data = torch.zeros(per, dtype=data.dtype, device=data.device)
            data[:chunk.numel()] = chunk
        if self.buffer is not None:
            payload: Any = self.buffer.store(data)
        elif self.offload:
            payload = torch.empty(data.shape, dtype=data.dtype, device="cpu", pin_memory=_pin())
            payload.copy_(data, non_blocking=payload.is_pinned())
        else:
            payload = data
        return (tensor.device, tensor.shape, padded, payload)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, shape, padded, payload = packed
        data = payload.tensor if isinstance(payload, _Slot) else payload
        data = data.to(device, non_blocking=True)
        if padded is not None:
            from . import comm

            full = torch.empty(self.tp.size * data.numel(), dtype=data.dtype, device=data.device)
            comm.all_gather(full, data.contiguous(), group=self.tp.group)  # the pieces in rank order
            data = full[:math.prod(shape)]
        return data.view(shape) if padded is not None or isinstance(payload, _Slot) else data


@functools.cache
def _pin() -> bool:
    from .accelerator import get_accelerator

    return get_accelerator().supports("pinned_memory")


def _device_of(args: tuple) -> torch.device | None:
    """The device of the first non-CPU tensor argument; None on a CPU run."""
    return next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"), None)


def _hooks_for(args: tuple) -> contextlib.AbstractContextManager:
    cfg = _state.config
    device = _device_of(args)
    device_run = device is not None
    tp = None
    if cfg.partition_activations:
        if _state.tensor_parallel is None:
            _state.tensor_parallel = _resolve_tensor_parallel(_state.mpu)
        tp = _state.tensor_parallel if _state.tensor_parallel.size > 1 else None
    offload = cfg.cpu_checkpointing and device_run
    buffer = None
    if cfg.contiguous_memory_optimization and device_run:
        key = ("cpu" if offload else str(device), offload)
        buffer = _state.buffers.get(key)
        if buffer is None:
            buffer = _state.buffers[key] = ContiguousActivationBuffer(
                cfg.number_checkpoints, "cpu" if offload else device, pin_memory=offload and _pin())
    if tp is None and buffer is None:
        if offload:
            return torch.autograd.graph.save_on_cpu(pin_memory=_pin())
        return contextlib.nullcontext()
    store = _InputStore(offload, buffer, tp)
    return torch.autograd.graph.saved_tensors_hooks(store.pack, store.unpack)


def _instrumented(function: Callable, sync: bool, profile: bool) -> Callable:
    """Wrap ``function`` to synchronize and time its first call (forward) and later ones (recompute)."""
    from .accelerator import get_accelerator

    accelerator = get_accelerator()
    calls = 0

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        name = FORWARD_TIMER if calls == 0 else RECOMPUTE_TIMER
        calls += 1
        if sync:
            accelerator.synchronize()
        if not profile:
            return function(*args, **kwargs)
        timer = get_timers()(name)
        timer.start()
        try:  # the recompute stops early by raising once it has what backward needs
            return function(*args, **kwargs)
        finally:
            timer.stop()

    return run


def checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` keeping only its inputs for backward; recompute the rest.

    Outputs may be any structure of tensors and other values. RNG state is replayed in the
    recompute, so dropout gives the same mask and gradients equal those of the plain call.
    """
    cfg = _state.config
    if cfg.synchronize_checkpoint_boundary or cfg.profile:
        function = _instrumented(function, cfg.synchronize_checkpoint_boundary, cfg.profile)
    with _hooks_for(args):
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
        )
