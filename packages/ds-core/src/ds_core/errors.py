"""Error types shared by every ds package.

Each error message names the offending value, the rule it broke and how to fix it, so a user can act
on it without reading our code.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "DSError",
    "ConfigError",
    "AcceleratorError",
    "PluginError",
    "LaunchError",
    "CommError",
    "closest",
]


class DSError(Exception):
    """Base class of every error ds raises on purpose."""


class ConfigError(DSError, ValueError):
    """A config value breaks a rule. Raised before any process group or file is touched."""


class AcceleratorError(DSError, RuntimeError):
    """No usable accelerator, an unknown name, or an ambiguous choice."""


class PluginError(DSError, RuntimeError):
    """A plugin (entry point) could not be loaded or described itself wrongly."""


class LaunchError(DSError, ValueError):
    """Bad launcher input: hostfile, include/exclude filters, node counts."""


class CommError(DSError, RuntimeError):
    """The distributed environment is inconsistent (ranks, world size, topology)."""


def closest(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the nearest choice, or "" when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
