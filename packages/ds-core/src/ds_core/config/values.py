"""Strict config values: what JSON writes is what a key takes, with no silent coercion.

pydantic's default ("lax") mode turns ``"yes"``, ``1`` and ``"on"`` into ``True``, ``"2"`` into
``2`` and accepts ``NaN``. A DeepSpeed config that relies on one of those is almost always a mistake
(``"enabled": 1`` meant for another key, a quoted number from a template), and ``NaN`` silently turns
a check off. So every :class:`~ds_core.config.sections.Section` field of a simple type takes only:

- a boolean: ``true``/``false``, or the strings ``"true"``/``"false"`` (any case), which real
  configs use (Open-Assistant's) and DeepSpeed accepts;
- an integer: a JSON integer, or a float with an integral value (``5e8``, ``1e10`` are how configs
  write large counts); never a string or a boolean;
- a float: any finite JSON number; never a string, a boolean, ``NaN`` or an infinity;
- ``"auto"`` where the field allows it (the Hugging Face integration fills those in).

A ``NaN`` or infinite number is refused in every field, whatever its type. Free-form optimizer and
scheduler ``params`` are checked by :mod:`ds_core.config.optim`; there a number written as a string
(``"1e-5"``, what YAML 1.1 readers produce for exponent floats) is still read as the number.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Annotated, Any, Literal

from pydantic_core import PydanticCustomError

from ..errors import ConfigError

__all__ = ["finite_number", "strict_value", "value_error", "scalar_kind"]


def value_error(message: str) -> PydanticCustomError:
    """A pydantic error whose message is ``message`` verbatim (it names the rule and the fix)."""
    return PydanticCustomError("ds_value", message.replace("{", "{{").replace("}", "}}"))


def finite_number(owner: str, key: str, value: Any) -> float:
    """``value`` as a float; numbers written as strings (``"1e-08"``) are accepted, as YAML readers emit them."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {key} {value!r} must be a finite number")
    return float(value)


def scalar_kind(annotation: Any) -> tuple[str | None, bool, bool]:
    """(kind, "auto" allowed, None allowed) of a field annotation; kind is bool, int, float or None.

    Only plain scalars (optionally Optional, Annotated with constraints, or unioned with
    ``Literal["auto"]``) have a kind; anything else is left to the field's own validation.
    """
    auto = none = False
    kinds: set[str] = set()
    stack = [annotation]
    while stack:
        ann = stack.pop()
        origin = typing.get_origin(ann)
        if origin is Annotated:
            stack.append(typing.get_args(ann)[0])
        elif origin in (typing.Union, types.UnionType):
            stack.extend(typing.get_args(ann))
        elif origin is Literal:
            values = typing.get_args(ann)
            if values == ("auto",):
                auto = True
            else:
                return None, False, False
        elif ann is type(None):
            none = True
        elif ann is bool:
            kinds.add("bool")
        elif ann is int:
            kinds.add("int")
        elif ann is float:
            kinds.add("float")
        else:
            return None, False, False
    if kinds == {"int", "float"}:
        kinds = {"float"}
    if len(kinds) != 1:
        return None, auto, none
    return kinds.pop(), auto, none


def _nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def strict_value(annotation: Any, value: Any) -> Any:
    """``value`` checked (and normalised) for a field of type ``annotation``; raises a pydantic error
    naming the rule and the fix when JSON wrote something else."""
    if _nonfinite(value):
        raise value_error(f"{value!r} is not a finite number; write a number (NaN and infinities turn checks "
                          "off silently, so they are refused)")
    kind, auto, none = scalar_kind(annotation)
    if kind is None or value is None and none:
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        if auto:
            return "auto"
        raise value_error(f"'auto' is not allowed for this key; write a {_kind_name(kind)} (a trainer fills "
                          f"'auto' in through ds_core.config.resolve_auto)")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, (int, float)):
            return _raise(f"the number {value!r} is not a boolean; write true or false")
        return _raise(f"{value!r} is not a boolean; write true or false")
    if isinstance(value, bool):
        return _raise(f"{str(value).lower()} is a boolean, not a number; write a {_kind_name(kind)}")
    if isinstance(value, str):
        return _raise(f"{value!r} is a string; write the {_kind_name(kind)} without quotes"
                      + (f" ({value.strip()})" if _is_number(value) else ""))
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, float):
            return _raise(f"{value!r} is not a whole number; write an integer")
        return value
    if kind == "float" and isinstance(value, int):
        return value
    return value


def _kind_name(kind: str) -> str:
    return {"bool": "true or false", "int": "whole number", "float": "number"}[kind]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _raise(message: str) -> Any:
    raise value_error(message)
