"""Build the optimizer named in the config's ``optimizer`` section, with DeepSpeed's names and keys.

``build_optimizer`` turns ``{"type": "AdamW", "params": {...}}`` into a ``torch.optim.Optimizer``:

- Adam, AdamW, SGD and Adagrad are ``torch.optim`` classes. Where torch has a fused kernel for the
  device (Adam/AdamW/SGD on CPU and CUDA, Adagrad on CPU) it is used, else ``foreach`` off the CPU:
  on CPU the fused AdamW step is several times faster than the per-tensor loop.
- Lamb and Lion are the pure-PyTorch classes of :mod:`ds_core.optim.lamb_lion`.
- Before any of that, the op registry is asked for a kernel optimizer (:func:`kernel_optimizer_class`):
  a ``ds.ops`` provider may offer e.g. a C++ CPU Adam. It is used for fp32 parameters on the device it
  serves when its constructor takes every key the config sets (amsgrad, maximize, ...).

DeepSpeed semantics kept: ``Adam`` is AdamW (decoupled weight decay, Loshchilov & Hutter 2019) unless
``adam_w_mode`` is false, in which case it is L2-regularised Adam (Kingma & Ba 2015); ``AdamW`` is
always decoupled; ``torch_adam: true`` forces ``torch.optim``. A value ``"auto"`` means "use the
default". Every choice is recorded on the optimizer for the engine's log: see :func:`describe`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .. import ops
from ..config.optim import OPTIMIZER_DEFAULTS, OPTIMIZERS, optimizer_name
from ..config.optim import resolve_optimizer_params as _resolve_params
from ..config.sections import OptimizerConfig
from ..errors import ConfigError
from .lamb_lion import Lamb, Lion

__all__ = ["build_optimizer", "kernel_optimizer_class", "describe", "OPTIMIZER_DEFAULTS", "KERNEL_NAMES"]

#: Names a kernel provider may serve, and the keyword arguments its class is always constructed with.
KERNEL_NAMES: dict[str, tuple[str, ...]] = {
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
    "adagrad": ("lr", "eps", "weight_decay"),
    "lion": ("lr", "betas", "weight_decay"),
}

_CANONICAL = {name.lower(): name for name in OPTIMIZERS}
_ONEBIT = {"onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb"}
# Modes the factory consumes itself; they never reach a constructor.
_MODE_KEYS = {"adam_w_mode", "torch_adam"}
# torch fused kernels per optimizer: the device types we pick them for automatically.
_AUTO_FUSED = {"adam": {"cpu", "cuda"}, "adamw": {"cpu", "cuda"}, "sgd": {"cpu", "cuda"}, "adagrad": {"cpu"}}
_TORCH_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                  "adagrad": torch.optim.Adagrad}


def describe(optimizer: Any) -> str:
    """One line saying which implementation ``build_optimizer`` chose, e.g. for the engine's log."""
    chosen = getattr(optimizer, "ds_implementation", None)
    if chosen:
        return str(chosen)
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def kernel_optimizer_class(name: str, device_type: str) -> type[torch.optim.Optimizer] | None:
    """Ask every ``ds.ops`` provider for an optimizer class serving ``name`` on ``device_type``.

    A provider offers classes through either attribute:

    - ``optimizer_classes``: a mapping ``{"adam": cls, ...}`` (lower-case names) — or a callable
      ``(name, device_type) -> cls | None``. Classes in a mapping serve the device types listed in
      their ``device_types`` attribute, or only ``"cpu"`` when they have none;
    - ``optimizer_class``: a callable ``(name, device_type) -> cls | None``.

    Returns the class from the first provider (by name) that answers, or None. A provider that
    raises or returns something that is not an Optimizer subclass is reported with a warning and
    skipped: a broken plugin never stops training.
    """
    found = _find_kernel(name, device_type)
    return found[0] if found else None


def _find_kernel(name: str, device_type: str) -> tuple[type[torch.optim.Optimizer], str] | None:
    """:func:`kernel_optimizer_class` plus the name of the provider that offered the class."""
    name = name.lower()
    for provider_name, provider in sorted(ops.providers().items()):
        for attr in ("optimizer_classes", "optimizer_class"):
            offer = getattr(provider, attr, None)
            if offer is None:
                continue
            try:
                if isinstance(offer, Mapping):
                    cls = offer.get(name)
                    if cls is not None and device_type not in tuple(getattr(cls, "device_types", ("cpu",))):
                        cls = None
                elif callable(offer):
                    cls = offer(name, device_type)
                else:
                    raise TypeError(f"{attr} is a {type(offer).__name__}, expected a mapping or a callable")
            except Exception as exc:  # a broken provider is reported, not fatal
                warnings.warn(f"ops provider {provider_name!r}: {attr} failed for {name!r} on "
                              f"{device_type!r} ({type(exc).__name__}: {exc}); using the default optimizer",
                              RuntimeWarning, stacklevel=2)
                continue
            if cls is None:
                continue
            if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
                warnings.warn(f"ops provider {provider_name!r} offered {cls!r} for optimizer {name!r}, which is "
                              "not a torch.optim.Optimizer subclass; ignoring it", RuntimeWarning, stacklevel=2)
                continue
            return cls, provider_name
    return None


def build_optimizer(
    config: OptimizerConfig, params: Iterable[Any], *, device_type: str = "cpu"
) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params`` (tensors, or param-group dicts).

    Per-group hyper-parameters in group dicts are kept as given; the config's values are the
    defaults for keys a group does not set. ``device_type`` is where the parameters live (it picks
    kernels and fused implementations). The returned optimizer carries ``ds_implementation``, a
    one-line description of what was chosen (see :func:`describe`).
    """
    name = _canonical_name(config.type)
    display = _CANONICAL[name]
    values = _resolve_params(display, name, dict(config.params))
    groups = _normalise_params(params)
    tensors = [p for group in groups for p in group["params"]]
    if name in _ONEBIT:  # 1-bit optimizers: ds_core.optim.onebit (averaged over the world unless set_group)
        from . import onebit

        optimizer = getattr(onebit, _ONEBIT[name])(groups, **values)
        optimizer.ds_implementation = f"ds_core {_ONEBIT[name]} (1-bit compressed momentum)"
        return optimizer

    decoupled = True
    if name in ("adam", "adamw"):
        decoupled = name == "adamw" or values["adam_w_mode"]
        if name == "adamw" and values["adam_w_mode"] is False:
            warnings.warn("optimizer AdamW: adam_w_mode false is ignored, AdamW always decouples weight decay "
                          "(as in DeepSpeed); for L2-regularised Adam use type 'Adam' with adam_w_mode false",
                          UserWarning, stacklevel=2)
        if not values["bias_correction"]:
            raise ConfigError(f"optimizer {display}: bias_correction false is not supported (torch.optim.Adam always "
                              "corrects the moment bias); remove bias_correction or set it to true")
        variant = "adamw" if decoupled else "adam"
    else:
        variant = name
    if name == "lamb" and values["amsgrad"]:
        raise ConfigError("optimizer Lamb: amsgrad true is not supported (nor by DeepSpeed's FusedLamb); "
                          "remove amsgrad or set it to false")

    kernel_note = ""
    if variant in KERNEL_NAMES:
        built, kernel_note = _try_kernel(display, variant, values, groups, tensors, device_type)
        if built is not None:
            return built

    try:
        optimizer, chosen = _build_default(name, variant, values, groups, tensors, device_type)
    except ValueError as exc:  # the constructors' own range checks (e.g. nesterov without momentum)
        raise ConfigError(f"optimizer {display}: {exc}; fix it in the optimizer params") from exc
    if name in ("adam", "adamw"):
        chosen += " [decoupled weight decay]" if decoupled else " [L2 weight decay]"
    optimizer.ds_implementation = chosen + kernel_note  # type: ignore[attr-defined]
    return optimizer


def _build_default(
    name: str, variant: str, values: dict[str, Any], groups: list[dict[str, Any]],
    tensors: list[torch.Tensor], device_type: str,
) -> tuple[torch.optim.Optimizer, str]:
    """The torch.optim or pure-PyTorch optimizer, and its description."""
    if name == "lamb":
        kwargs = {k: v for k, v in values.items() if k != "amsgrad"}
        return Lamb(groups, **kwargs), "ds_core Lamb (pure PyTorch)"
    if name == "lion":
        return Lion(groups, **values), "ds_core Lion (pure PyTorch)"
    cls = _TORCH_CLASSES[variant]
    kwargs = {k: v for k, v in values.items() if k not in _MODE_KEYS and k != "bias_correction"}
    kwargs.update(_implementation_flags(variant, kwargs, tensors, device_type))
    kwargs = {k: v for k, v in kwargs.items() if not (k in ("fused", "foreach") and v is None)}
    flags = ", ".join(f"{k}=True" for k in ("fused", "foreach") if kwargs.get(k))
    return cls(groups, **kwargs), f"torch.optim.{cls.__name__}({flags})" if flags else f"torch.optim.{cls.__name__}"


def _canonical_name(type_name: str) -> str:
    return optimizer_name(type_name, "optimizer type")  # the schema and its errors live in ds_core.config.optim


def _normalise_params(params: Iterable[Any]) -> list[dict[str, Any]]:
    """A list of group dicts whose "params" are lists (so they can be inspected and still passed on)."""
    if isinstance(params, torch.Tensor):
        raise ConfigError("build_optimizer: params is a single tensor; pass an iterable of tensors, e.g. "
                          "model.parameters(), or a list of param-group dicts")
    items = list(params)
    if not items:
        raise ConfigError("build_optimizer: params is empty; pass model.parameters() of a model with "
                          "trainable parameters, or non-empty param groups")
    if all(isinstance(item, Mapping) for item in items):
        groups = []
        for i, item in enumerate(items):
            if "params" not in item:
                raise ConfigError(f"build_optimizer: param group {i} has no 'params' key; each group is "
                                  "{'params': [tensors], ...hyper-parameters}")
            group = dict(item)
            inner = group["params"]
            group["params"] = [inner] if isinstance(inner, torch.Tensor) else list(inner)
            groups.append(group)
        return groups
    if any(isinstance(item, Mapping) for item in items):
        raise ConfigError("build_optimizer: params mixes tensors and param-group dicts; put the loose "
                          "tensors in a group of their own: {'params': [...]}")
    return [{"params": items}]


def _params_fit_kernel(tensors: list[torch.Tensor], device_type: str) -> str:
    """Why these parameters cannot use a kernel optimizer, or "" when they can."""
    for p in tensors:
        if p.dtype != torch.float32:
            return f"parameters are {p.dtype}, kernels take fp32"
        if p.device.type != device_type:
            return f"parameters live on {p.device.type}, not {device_type}"
    return ""


def _try_kernel(
    display: str, variant: str, values: dict[str, Any], groups: list[dict[str, Any]],
    tensors: list[torch.Tensor], device_type: str,
) -> tuple[torch.optim.Optimizer | None, str]:
    """Build the kernel optimizer when one is offered and usable; else (None, why-not note)."""
    if values.get("torch_adam"):
        return None, ""
    found = _find_kernel(variant, device_type)
    if found is None:
        return None, ""
    cls, provider = found
    where = f"{cls.__module__}.{cls.__qualname__} from ops provider {provider!r}"
    kwargs, unsupported = _kernel_kwargs(cls, variant, values)
    reason = (f"its constructor does not take {', '.join(unsupported)}, which the config sets"
              if unsupported else _params_fit_kernel(tensors, device_type))
    if not reason:
        try:
            optimizer = cls(groups, **kwargs)
        except Exception as exc:
            reason = f"construction failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"optimizer {display}: kernel {where} {reason}; using the default",
                          RuntimeWarning, stacklevel=3)
        else:
            optimizer.ds_implementation = f"kernel {where}"  # type: ignore[attr-defined]
            return optimizer, ""
    return None, f"; kernel {where} not used: {reason}"


def _kernel_kwargs(
    cls: type[torch.optim.Optimizer], variant: str, values: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Constructor arguments for a kernel class, and the config keys it cannot take.

    The class always gets :data:`KERNEL_NAMES`' keys; any other key the config sets to a
    non-default value is passed when the constructor names it (or takes ``**kwargs``) and is
    reported otherwise. An Adam class with an ``adamw_mode``/``adam_w_mode`` argument (DeepSpeed's
    CPU Adam convention) is told which variant to run.
    """
    try:
        accepted = dict(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    defaults = OPTIMIZER_DEFAULTS[variant]
    kwargs = {k: values[k] for k in KERNEL_NAMES[variant]}
    unsupported = []
    for key, value in values.items():
        if key in kwargs or key in _MODE_KEYS or value == defaults[key]:
            continue
        if key in accepted or takes_any:
            kwargs[key] = value
        else:
            unsupported.append(key)
    if variant in ("adam", "adamw"):
        mode_key = next((k for k in ("adamw_mode", "adam_w_mode") if k in accepted), None)
        if mode_key is not None:
            kwargs[mode_key] = variant == "adamw"
    return kwargs, unsupported


def _implementation_flags(
    variant: str, kwargs: dict[str, Any], tensors: list[torch.Tensor], device_type: str
) -> dict[str, Any]:
    """fused/foreach for a torch optimizer: the config's choice if it made one, else the fastest safe one."""
    if kwargs["fused"] is not None or kwargs["foreach"] is not None:
        return {}
    on_device = all(p.device.type == device_type and torch.is_floating_point(p) for p in tensors)
    if not on_device:
        return {}
    if device_type in _AUTO_FUSED.get(variant, ()):
        return {"fused": True}
    if device_type != "cpu":
        return {"foreach": True}
    return {}

