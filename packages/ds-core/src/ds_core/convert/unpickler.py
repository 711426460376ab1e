"""Read DeepSpeed's ``torch.save`` files without running their code: a restricted unpickler.

A pickle names the callables that rebuild its objects (``GLOBAL module name``) and the unpickler calls
them: a file whose pickle names ``os.system`` runs a shell command when loaded. DeepSpeed's optimizer
files hold a few of DeepSpeed's own classes (its loss scaler, its ZeRO-stage enum, fragment
addresses), so ``torch.load(weights_only=True)`` refuses them, and loading them with
``weights_only=False`` would trust the file completely.

:class:`RestrictedUnpickler` resolves a global only if it is on the allowlist:

- torch's tensor and storage rebuilding functions (the ones ``torch.load(weights_only=True)`` admits),
  ``torch.Size``, dtypes and devices, and ``collections.OrderedDict``;
- an allowlist of DeepSpeed state classes (:data:`DEEPSPEED_CLASSES`), each replaced by an
  :class:`InertObject` stand-in that only records the arguments and state the pickle gives it:
  DeepSpeed is never imported and none of its code runs.

Anything else raises :class:`UnsafeCheckpointError` naming the module and class, before that global
is called. The file is read through ``torch.load(..., pickle_module=...)`` so torch's own zip
archive and storage handling is used unchanged (storages are resolved by torch before
``find_class`` is reached).
"""

from __future__ import annotations

import collections
import io
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from ..engine.checkpoint_files import CheckpointError

__all__ = ["UnsafeCheckpointError", "InertObject", "RestrictedUnpickler", "DEEPSPEED_CLASSES", "load_restricted"]


class UnsafeCheckpointError(CheckpointError):
    """A pickle names a global outside the allowlist; nothing it names was called."""


#: DeepSpeed classes found in its checkpoints, read as inert data (module path -> class names).
DEEPSPEED_CLASSES: dict[str, frozenset[str]] = {
    "deepspeed.runtime.fp16.loss_scaler": frozenset({"LossScaler", "DynamicLossScaler", "LossScalerBase"}),
    "deepspeed.runtime.zero.config": frozenset({"ZeroStageEnum"}),
    "deepspeed.utils.tensor_fragment": frozenset({"fragment_address"}),
    "deepspeed.checkpoint.constants": frozenset(),
    "deepspeed.runtime.zero.offload_config": frozenset({"OffloadDeviceEnum"}),
}


class InertObject:
    """What a DeepSpeed class in a checkpoint becomes: its qualified name, the arguments it was built
    with and the state the pickle set — plain data, no behaviour.

    ``obj["cur_scale"]``/``obj.get(...)`` read the state; :attr:`args` holds constructor arguments
    (an enum's value).
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "state", {})
        return self

    def __init__(self, *args, **kwargs) -> None:  # the pickle's REDUCE calls the class: record only
        pass

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            merged = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if not isinstance(state, dict):
            state = {"__state__": state}
        self.state.update(state)

    def __setattr__(self, name, value) -> None:  # BUILD without __setstate__ never reaches here
        self.state[name] = value

    def __getitem__(self, key):
        return self.state[key]

    def get(self, key, default=None):
        return self.state.get(key, default)

    @property
    def value(self):
        """An enum's value (its first constructor argument, or the ``_value_`` of its state)."""
        return self.args[0] if self.args else self.state.get("_value_")

    def __repr__(self) -> str:
        return f"<inert {self.qualname} args={self.args!r} state={self.state!r}>"


_STANDINS: dict[tuple[str, str], type] = {}


def _standin(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (InertObject,), {"qualname": f"{module}.{name}", "__module__": module})
    return _STANDINS[key]


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's rebuild for tensors carrying Python attributes (DeepSpeed's stage-3 ``ds_*`` fields):
    the tensor is rebuilt with an allowed function and its attributes are dropped (they describe the
    saving run's partitioning, not data)."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafeCheckpointError(f"a tensor of type {new_type!r} is not allowed in a checkpoint read as data")
    return func(*args)


def _tensor_rebuilders() -> dict[tuple[str, str], Any]:
    import torch._utils as tu

    allowed = {}
    # dense tensors and parameters over storages torch has already resolved; nothing that takes a class
    # or a callable from the file (``_rebuild_wrapper_subclass``, ``_rebuild_parameter_with_state``'s hooks)
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_sparse_tensor", "_rebuild_meta_tensor_no_storage"):
        if hasattr(tu, name):
            allowed[("torch._utils", name)] = getattr(tu, name)
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    allowed[("torch", "Tensor")] = torch.Tensor
    allowed[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("builtins", "set")] = set
    allowed[("builtins", "frozenset")] = frozenset
    allowed[("builtins", "complex")] = complex
    allowed[("builtins", "slice")] = slice
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


_ALLOWED: dict[tuple[str, str], Any] = {}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` admitting only the allowlist (see the module docstring)."""

    source = "a checkpoint file"

    def find_class(self, module: str, name: str):
        if not _ALLOWED:
            _ALLOWED.update(_tensor_rebuilders())
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if name in DEEPSPEED_CLASSES.get(module, ()):
            return _standin(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} names {module}.{name}, which is not on the allowlist of classes read as data "
            f"(tensors, plain containers and DeepSpeed's own state classes); it was refused without being "
            f"called. If the file is yours and {module}.{name} is harmless state, convert it with DeepSpeed's "
            f"own tools to plain tensors first; never load an untrusted file with pickle")


def _pickle_module(source: str) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose ``Unpickler`` is restricted (``torch.load``'s
    ``pickle_module``: torch subclasses ``Unpickler`` and calls ``load``)."""
    mod = types.ModuleType("ds_core_restricted_pickle")
    mod.Unpickler = type("Unpickler", (RestrictedUnpickler,), {"source": source})
    mod.load = lambda f, **kw: mod.Unpickler(f, **kw).load()
    mod.loads = lambda data, **kw: mod.Unpickler(io.BytesIO(data), **kw).load()  # restricted too
    mod.__name__ = "pickle"  # torch checks nothing else
    return mod


def load_restricted(path: str | Path) -> Any:
    """Load one ``torch.save`` file with the restricted unpickler (tensors on the CPU)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module(str(path)))
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} cannot be read as a torch.save file ({type(exc).__name__}: {exc}); it is "
                              f"damaged or not a checkpoint file") from None
