"""Checks for values inside free-form config dicts (optimizer and scheduler ``params``)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError

__all__ = ["finite_number"]


def finite_number(owner: str, key: str, value: Any) -> float:
    """``value`` as a float; numbers written as strings (``"1e-08"``) are accepted, as other tools emit them."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {key} {value!r} must be a finite number")
    return float(value)
