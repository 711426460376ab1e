"""The op registry seam: find a kernel registered under ``torch.ops.ds_ops`` or fall back.

Kernel packages (ds-ops, accelerator vendors) register through the ``ds.ops`` entry-point group; the
value is a qualified name of a callable that registers its ``torch.library`` ops when called. ds-core
never imports a kernel package by name: callers ask :func:`get_op` and pass a pure-PyTorch default,
so every feature works without kernels and gets faster with them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import plugins

__all__ = ["load_op_providers", "get_op", "has_op", "providers"]

_lock = threading.Lock()
_loaded: dict[str, Any] | None = None


def load_op_providers() -> dict[str, Any]:
    """Call every ``ds.ops`` provider's registration function once; broken ones are reported."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                loaded: dict[str, Any] = {}
                for ref in plugins.entries("ds.ops"):
                    try:
                        register = ref.load()
                        loaded[ref.name] = register() if callable(register) else register
                    except Exception as exc:
                        plugins.report_failure(ref, ref.group, ref.name, exc)
                _loaded = loaded
    return _loaded


def providers() -> dict[str, Any]:
    """Name -> whatever each provider's registration returned (e.g. a catalogue for reports)."""
    return dict(load_op_providers())


def has_op(name: str) -> bool:
    import torch

    load_op_providers()
    return hasattr(torch.ops, "ds_ops") and hasattr(torch.ops.ds_ops, name)


def get_op(name: str, default: Callable[..., Any] | None = None) -> Callable[..., Any] | None:
    """``torch.ops.ds_ops.<name>`` when a provider registered it, else ``default``."""
    import torch

    if has_op(name):
        return getattr(torch.ops.ds_ops, name)
    return default
