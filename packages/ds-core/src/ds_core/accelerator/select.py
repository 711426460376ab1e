"""Choosing the accelerator: discovery through ``ds.accelerators`` entry points, once per process.

Order of decision:
1. ``DS_ACCELERATOR=name`` picks that plugin, and only that one is imported.
2. Otherwise every third-party plugin is imported and probed; exactly one active wins, two is an
   error (set ``DS_ACCELERATOR``). Broken plugins are reported by name and skipped.
3. Otherwise the available built-in with the highest priority (cuda > privateuse1 > cpu).
"""

from __future__ import annotations

import os
import threading

from .. import plugins
from ..errors import AcceleratorError, PluginError, closest
from ..protocol import missing_members
from .base import Accelerator

__all__ = ["get_accelerator", "set_accelerator", "available_accelerators", "BUILTIN_DIST"]

BUILTIN_DIST = "ds-core"
ENV = "DS_ACCELERATOR"

_lock = threading.Lock()
_chosen: Accelerator | None = None


def _instantiate(ref: plugins.PluginRef) -> Accelerator:
    obj = ref.load()
    acc = obj() if isinstance(obj, type) else obj
    missing = missing_members(acc, Accelerator)
    if missing:
        raise PluginError(
            f"accelerator plugin {ref.name!r} ({ref.value}) does not implement the Accelerator protocol: "
            f"missing {', '.join(missing)}; add them, or subclass ds_core.accelerator.TorchAccelerator, which "
            f"forwards the device calls to torch"
        )
    return acc


def _is_builtin(ref: plugins.PluginRef) -> bool:
    return ref.dist is None or ref.dist.replace("_", "-").lower() == BUILTIN_DIST


def available_accelerators() -> dict[str, bool]:
    """Name -> whether it is usable here, for every accelerator plugin that loads."""
    result: dict[str, bool] = {}
    for ref in plugins.entries("ds.accelerators"):
        try:
            result[ref.name] = bool(_instantiate(ref).is_available())
        except PluginError as exc:
            plugins.report_failure(ref, ref.group, ref.name, exc)
    return result


def _select() -> Accelerator:
    refs = plugins.entries("ds.accelerators")
    by_name = {ref.name: ref for ref in refs}
    wanted = os.environ.get(ENV)
    if wanted:
        if wanted not in by_name:
            raise AcceleratorError(
                f"{ENV}={wanted!r} names no installed accelerator{closest(wanted, by_name)}; "
                f"available: {', '.join(sorted(by_name)) or 'none'}; install its plugin or "
                f"unset {ENV}"
            )
        acc = _instantiate(by_name[wanted])
        if not acc.is_available():
            raise AcceleratorError(
                f"{ENV}={wanted!r}: the accelerator is installed but its probe reports it "
                f"unavailable on this machine; pick another or unset {ENV}"
            )
        return acc

    third_party: list[Accelerator] = []
    builtins: list[Accelerator] = []
    for ref in refs:
        try:
            acc = _instantiate(ref)
            active = acc.is_available()
        except Exception as exc:  # a probe that raises counts as a broken plugin
            plugins.report_failure(ref, ref.group, ref.name, exc)
            continue
        if active:
            (builtins if _is_builtin(ref) else third_party).append(acc)
    if len(third_party) > 1:
        names = ", ".join(sorted(a.name for a in third_party))
        raise AcceleratorError(
            f"more than one third-party accelerator is active ({names}); ds cannot guess which "
            f"to use: set {ENV} to one of them"
        )
    if third_party:
        return third_party[0]
    if not builtins:
        raise AcceleratorError(
            "no accelerator is available (not even cpu): reinstall ds-core, whose entry points "
            "register the built-in accelerators"
        )
    return max(builtins, key=lambda a: a.priority)


def get_accelerator() -> Accelerator:
    """The accelerator for this process, resolved once."""
    global _chosen
    if _chosen is None:
        with _lock:
            if _chosen is None:
                _chosen = _select()
    return _chosen


def set_accelerator(acc: Accelerator | None) -> None:
    """Force an accelerator (or ``None`` to detect again on next use)."""
    global _chosen
    missing = missing_members(acc, Accelerator) if acc is not None else []
    if missing:
        raise AcceleratorError(f"{acc!r} does not implement the Accelerator protocol: missing {', '.join(missing)}")
    _chosen = acc
