"""ds-ops: kernels registered as torch.library custom ops in the ``ds_ops`` namespace.

Callers reach ops through ``torch.ops.ds_ops.<name>`` (``ds_core.ops.get_op``); this package's
``ds.ops`` entry point (:func:`ds_ops.registry.register`) defines them. The names below are imported
on first use so ``import ds_ops`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.0.1"

_LAZY = {
    "DSCPUAdam": "ds_ops.cpu_optim",
    "DSCPUAdagrad": "ds_ops.cpu_optim",
    "DSCPULion": "ds_ops.cpu_optim",
    "aio": "ds_ops.aio",
    "register": "ds_ops.registry",
    "register_kernel": "ds_ops.registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ds_ops' has no attribute {name!r}")
    if name == "aio":
        return importlib.import_module(module)
    return getattr(importlib.import_module(module), name)
