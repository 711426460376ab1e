"""DeepSpeed's config keys as data, and what ds does with each one.

``deepspeed_keys.json`` (next to this module) lists every key DeepSpeed 0.19 reads from its JSON
config, with older spellings real configs still carry, and says for each whether ds gives it its
effect (``handled``, and by which package), accepts it with one warning (``no_effect``), refuses it
naming the feature (``refused``), owns it through a feature package (``package``), or reads it as
another key (``alias``). The file's ``about`` field documents the entry format. Editing the data is
how a key changes status; :mod:`ds_core.config.screen` applies it.

Unknown keys are judged against the keys valid at their level: one or two edits away from one of
them (a near miss, ``bp16``) is a typo and an error; anything else is a project's own key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["KeyEntry", "key_table", "entry", "children", "near_miss", "edit_distance", "triggers"]

DATA_FILE = "deepspeed_keys.json"
STATUSES = ("handled", "section", "no_effect", "refused", "package", "alias")
WHENS = ("changed", "enabled", "present", "changed_keys")


@dataclass(frozen=True)
class KeyEntry:
    """One key of the table; ``path`` is dotted from the top of the config (``fp16.loss_scale``)."""

    path: str
    status: str
    by: str | None = None
    strict: bool = False
    default: Any = None
    inert: tuple[Any, ...] | None = None
    when: str = "changed"
    enabled_default: bool = False
    keys: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    feature: str = ""
    fix: str = ""
    alias_of: str | None = None
    needs: str | None = None
    only_when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    since: str | None = None
    ds_only: bool = False
    doc: str = ""

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def parent(self) -> str:
        return self.path.rsplit(".", 1)[0] if "." in self.path else ""

    @property
    def container(self) -> bool:
        """True when the value is an object whose keys are entries of their own."""
        return self.status in ("section", "package")


def _entry(path: str, data: dict[str, Any]) -> KeyEntry:
    status = data.get("status")
    if status not in STATUSES:
        raise ValueError(f"{DATA_FILE}: {path}: status {status!r} is not one of {STATUSES}")
    when = data.get("when", "changed")
    if when not in WHENS:
        raise ValueError(f"{DATA_FILE}: {path}: when {when!r} is not one of {WHENS}")
    known = {f for f in KeyEntry.__dataclass_fields__ if f != "path"}
    extra = set(data) - known
    if extra:
        raise ValueError(f"{DATA_FILE}: {path}: unknown fields {sorted(extra)}")
    inert = data.get("inert")
    return KeyEntry(
        path=path, status=status, by=data.get("by"), strict=bool(data.get("strict", False)),
        default=data.get("default"), inert=None if inert is None else tuple(inert), when=when,
        enabled_default=bool(data.get("enabled_default", False)), keys=tuple(data.get("keys", ())),
        defaults=dict(data.get("defaults", {})), why=data.get("why", ""), feature=data.get("feature", ""),
        fix=data.get("fix", ""), alias_of=data.get("alias_of"), needs=data.get("needs"),
        only_when={k: tuple(v) for k, v in data.get("only_when", {}).items()}, since=data.get("since"),
        ds_only=bool(data.get("ds_only", False)), doc=data.get("doc", ""),
    )


@dataclass(frozen=True)
class KeyTable:
    entries: dict[str, KeyEntry]
    deepspeed_version: str
    by_parent: dict[str, dict[str, KeyEntry]]


@cache
def key_table() -> KeyTable:
    """The table, read once from the package data."""
    text = (Path(__file__).parent / DATA_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    entries = {path: _entry(path, spec) for path, spec in data["keys"].items()}
    by_parent: dict[str, dict[str, KeyEntry]] = {}
    for e in entries.values():
        by_parent.setdefault(e.parent, {})[e.name] = e
    for e in entries.values():
        if e.parent and e.parent not in entries:
            raise ValueError(f"{DATA_FILE}: {e.path} has no entry for its section {e.parent!r}")
        if e.status == "alias" and e.alias_of not in by_parent.get(e.parent, {}):
            raise ValueError(f"{DATA_FILE}: alias {e.path} points to {e.alias_of!r}, not a key of its section")
    return KeyTable(entries, data["deepspeed"]["version"], by_parent)


def entry(path: str) -> KeyEntry | None:
    return key_table().entries.get(path)


def children(parent: str) -> dict[str, KeyEntry]:
    """Entries directly under ``parent`` ("" for the top level), by key name."""
    return key_table().by_parent.get(parent, {})


# -- typos ---------------------------------------------------------------------------------------

def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    if a == b:
        return 0
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def near_miss(key: str, valid: set[str] | list[str] | tuple[str, ...]) -> str | None:
    """The valid key ``key`` is most likely a typo of: one edit away for keys of up to four
    characters (``bp16``), two for longer ones; differences of case count as edits. None if no key
    is that close (then ``key`` is taken to be a project's own key, not a typo)."""
    best, best_distance = None, math.inf
    for candidate in sorted(valid):
        limit = 1 if min(len(key), len(candidate)) <= 4 else 2
        d = edit_distance(key, candidate)
        if d <= limit and d < best_distance:
            best, best_distance = candidate, d
    return best


# -- when a value asks for something -------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    # JSON gives 1 and 1.0, True and 1 as equal in Python; a bool is never the same as a number here.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def triggers(e: KeyEntry, value: Any) -> bool:
    """True when ``value`` asks for the behaviour entry ``e`` describes (and ds warns or refuses)."""
    if e.when == "enabled":
        if isinstance(value, bool):
            return value
        if isinstance(value, dict):
            enabled = value.get("enabled", e.enabled_default)
            return enabled is True or (isinstance(enabled, str) and enabled.strip().lower() == "true")
        return value is not None
    if e.when == "present":
        return value not in (None, False, {}, [])
    if e.when == "changed_keys":
        if not isinstance(value, dict):
            return value not in (None, False, {})
        return any(k in e.defaults and not _same(v, e.defaults[k]) for k, v in value.items())
    inert = e.inert if e.inert is not None else (e.default,)
    if isinstance(value, str) and value.strip().lower() == "auto":
        return False  # "auto" means DeepSpeed's default, which asks for nothing
    return not any(_same(value, v) for v in inert)
