"""Checking an object against a ``typing.Protocol`` and naming what it lacks.

``isinstance(obj, SomeProtocol)`` on a ``runtime_checkable`` protocol answers yes or no; a plugin author
needs to know *which* members are missing. :func:`missing_members` lists them (methods as ``name()``),
and :func:`require` raises with that list, so a strategy or an accelerator that does not implement its
protocol fails where it is plugged in, naming the methods to add.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["protocol_members", "missing_members", "require"]

_SKIP = {"__init__", "__class_getitem__", "__init_subclass__", "__subclasshook__", "__parameters__",
         "__protocol_attrs__", "__non_callable_proto_members__", "__annotations__", "__dict__", "__doc__",
         "__module__", "__weakref__", "__abstractmethods__", "__orig_bases__", "__qualname__", "__slots__",
         "__static_attributes__", "__firstlineno__", "__type_params__"}


def protocol_members(protocol: type) -> dict[str, bool]:
    """Member name -> whether it is a method, for every member ``protocol`` declares (its bases too)."""
    out: dict[str, bool] = {}
    for base in reversed(protocol.__mro__):
        if base in (object,) or base.__module__ == "typing" or not getattr(base, "_is_protocol", False):
            continue
        for name in getattr(base, "__annotations__", {}):
            out.setdefault(name, False)
        for name, value in vars(base).items():
            if name in _SKIP or name.startswith("_abc_") or (name.startswith("_") and not name.startswith("__")):
                continue
            if name.startswith("__") and name.endswith("__"):
                continue
            out[name] = inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod))
    return out


def missing_members(obj: Any, protocol: type, methods_only: bool = False) -> list[str]:
    """Members of ``protocol`` that ``obj`` does not provide (``"step()"`` for a method), in declaration order."""
    missing = []
    for name, is_method in protocol_members(protocol).items():
        if methods_only and not is_method:
            continue
        try:
            value = getattr(obj, name)
        except AttributeError:
            missing.append(f"{name}()" if is_method else name)
            continue
        if is_method and not callable(value):
            missing.append(f"{name}()")
    return missing


def require(obj: Any, protocol: type, what: str, error: type[Exception], methods_only: bool = False) -> None:
    """Raise ``error`` naming every member of ``protocol`` that ``obj`` lacks; ``what`` says what ``obj`` is."""
    missing = missing_members(obj, protocol, methods_only)
    if missing:
        raise error(f"{what} ({type(obj).__module__}.{type(obj).__qualname__}) does not implement "
                    f"{protocol.__name__}: missing {', '.join(missing)}; add them (see the protocol's docstring)")
