"""bitsandbytes as an optional backend for 8-bit optimizers (the ``ds-ops[bnb]`` extra).

An optimizer config such as ``{"type": "AdamW8bit", "params": {"lr": 1e-4}}`` names a
bitsandbytes class; :func:`build_optimizer` maps the name (any case, ``_``/``-`` ignored) to it and
builds it. Their state is blockwise 8-bit (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization"), about a quarter of fp32 Adam's; tensors under bitsandbytes' ``min_8bit_size``
(4096 elements by default) keep 32-bit state. Paged variants page state to host memory under
memory pressure on CUDA; on CPU bitsandbytes runs them as the plain ones.

bitsandbytes is imported only when an optimizer is built, so this module imports without it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ds_core.errors import ConfigError, closest

__all__ = ["BNB_OPTIMIZERS", "is_bnb_optimizer", "resolve_name", "build_optimizer", "from_config", "available"]

# canonical name -> class name in bitsandbytes.optim (all present since bitsandbytes 0.43, AdEMAMix 0.44)
BNB_OPTIMIZERS: dict[str, str] = {
    name: name
    for name in (
        "Adam8bit",
        "AdamW8bit",
        "PagedAdam8bit",
        "PagedAdamW8bit",
        "Lion8bit",
        "PagedLion8bit",
        "SGD8bit",
        "RMSprop8bit",
        "Adagrad8bit",
        "LAMB8bit",
        "LARS8bit",
        "AdEMAMix8bit",
        "PagedAdEMAMix8bit",
    )
}
_BY_KEY = {name.lower(): name for name in BNB_OPTIMIZERS}


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").removeprefix("bnb.")


def resolve_name(name: str) -> str | None:
    """The canonical bitsandbytes class name for ``name`` ("adamw_8bit" -> "AdamW8bit"), or None."""
    return _BY_KEY.get(_key(name))


def is_bnb_optimizer(name: str) -> bool:
    """True when an optimizer config ``type`` names a bitsandbytes 8-bit optimizer."""
    return resolve_name(name) is not None


def available() -> bool:
    """True when bitsandbytes imports here."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception:
        return False
    return True


def _bnb_optim(name: str):
    try:
        optim = importlib.import_module("bitsandbytes.optim")
    except ImportError as exc:
        raise ConfigError(
            f"optimizer type {name!r} needs bitsandbytes, which is not installed ({exc}); "
            "run `pip install ds-ops[bnb]` or choose a torch optimizer such as 'AdamW'"
        ) from exc
    except Exception as exc:  # bitsandbytes present but broken (e.g. a mismatched native library)
        raise ConfigError(
            f"optimizer type {name!r} needs bitsandbytes, which failed to import "
            f"({type(exc).__name__}: {exc}); reinstall it with `pip install -U ds-ops[bnb]`"
        ) from exc
    cls = getattr(optim, name, None)
    if cls is None:
        version = getattr(importlib.import_module("bitsandbytes"), "__version__", "?")
        raise ConfigError(
            f"optimizer type {name!r} is not in bitsandbytes {version}; upgrade it with "
            "`pip install -U ds-ops[bnb]`"
        )
    return cls


def build_optimizer(name: str, params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    """Build the bitsandbytes optimizer ``name`` over ``params`` with ``kwargs`` (lr, betas, ...).

    Raises :class:`~ds_core.errors.ConfigError` for an unknown name (with the nearest one), a
    missing bitsandbytes (naming the ``ds-ops[bnb]`` extra) or an argument the class does not take.
    """
    canonical = resolve_name(name)
    if canonical is None:
        raise ConfigError(
            f"optimizer type {name!r} is not a bitsandbytes optimizer{closest(name, BNB_OPTIMIZERS)}; "
            f"choose one of {', '.join(BNB_OPTIMIZERS)}"
        )
    cls = _bnb_optim(canonical)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"optimizer {canonical} does not take {', '.join(map(repr, unknown))}"
            f"{closest(unknown[0], accepted)}; it accepts {', '.join(sorted(accepted))}"
        )
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])  # JSON configs give lists
    return cls(params, **kwargs)


def from_config(section: Any, params: Iterable[Any]) -> torch.optim.Optimizer:
    """Build from an optimizer config section (``.type`` and ``.params``, or a mapping with them)."""
    if isinstance(section, Mapping):
        name, kwargs = section["type"], dict(section.get("params", {}))
    else:
        name, kwargs = section.type, dict(section.params)
    auto = sorted(k for k, v in kwargs.items() if v == "auto")
    if auto:
        raise ConfigError(
            f"optimizer {name!r}: params {', '.join(auto)} are still 'auto'; resolve them before "
            "building the optimizer (the engine does) or give numbers"
        )
    return build_optimizer(name, params, **kwargs)
