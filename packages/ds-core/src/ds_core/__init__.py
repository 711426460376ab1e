"""ds-core: the contracts and the engine every ds package plugs into.

Submodules load on first use so ``import ds_core`` stays cheap (torch is the only heavy import):
``ds_core.accelerator``, ``ds_core.comm``, ``ds_core.config``, ``ds_core.plugins``, ``ds_core.ops``,
``ds_core.testing``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "accelerator",
    "comm",
    "config",
    "errors",
    "ops",
    "plugins",
    "initialize",
    "get_accelerator",
    "init_distributed",
    "parse_config",
    "DSConfig",
    "Topology",
    "DSError",
    "ConfigError",
]

_SUBMODULES = {"accelerator", "checkpointing", "comm", "config", "engine", "errors", "ops", "plugins",
               "testing"}
_ATTRS = {
    "initialize": "engine",
    "get_accelerator": "accelerator",
    "init_distributed": "engine",
    "Topology": "comm",
    "parse_config": "config",
    "DSConfig": "config",
    "DSError": "errors",
    "ConfigError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRS:
        return getattr(importlib.import_module(f"{__name__}.{_ATTRS[name]}"), name)
    raise AttributeError(f"module 'ds_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
