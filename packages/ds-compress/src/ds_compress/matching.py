"""Choosing modules by name: DeepSpeed's scopes, where each entry is a regular expression searched in
the qualified module name (``"attention.self"``, ``"layer\\.\\d+\\.output\\.dense"``), and ``"*"`` means
every compressible module. A pattern that matches nothing is an error naming it."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .errors import CompressionError

__all__ = ["match_modules", "module_by_name", "set_module", "tied_linears"]


def _compile(pattern: str, where: str) -> re.Pattern | None:
    if pattern == "*":
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CompressionError(f"{where}: module pattern {pattern!r} is not a valid regular expression "
                               f"({exc}); escape dots as '\\.' or use a plain substring") from None


def match_modules(model: nn.Module, patterns: Iterable[str], types: tuple[type, ...], where: str,
                  exclude: Iterable[str] = ()) -> list[str]:
    """Qualified names of the modules of ``types`` matching any pattern (in model order).

    Raises when a pattern matches no module of those types, naming the pattern and a few candidates.
    """
    candidates = [name for name, m in model.named_modules() if name and isinstance(m, types)]
    excluded = [_compile(p, where) for p in exclude]
    candidates = [n for n in candidates if not any(rx is None or rx.search(n) for rx in excluded)]
    chosen: list[str] = []
    for pattern in patterns:
        rx = _compile(pattern, where)
        hits = [n for n in candidates if rx is None or rx.search(n)]
        if not hits:
            kinds = "/".join(t.__name__ for t in types)
            sample = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
            raise CompressionError(
                f"{where}: module pattern {pattern!r} matches no {kinds} module of the model; the "
                f"patterns are regular expressions searched in module names such as: {sample or '(none)'}")
        chosen += [n for n in hits if n not in chosen]
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(chosen, key=order.__getitem__)


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def tied_linears(model: nn.Module) -> set[str]:
    """Linear layers whose weight is shared with another module (a tied output head)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            owners.setdefault(id(w), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names
            if isinstance(model.get_submodule(n), nn.Linear)}
