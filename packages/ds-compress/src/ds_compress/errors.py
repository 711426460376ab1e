"""The error ds-compress raises for bad input: it names the value, the rule and the fix."""

from __future__ import annotations

from ds_core.errors import ConfigError

__all__ = ["CompressionError"]


class CompressionError(ConfigError):
    """A compression setting does not fit the model (bits, group size, module pattern, heads, layers)."""
