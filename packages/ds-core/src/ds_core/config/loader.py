"""Reading a config from a dict, a JSON file path or a JSON string, rejecting duplicate keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["read_config"]


def _no_duplicates(where: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(
                    f"{where}: key {key!r} appears twice in one JSON object; JSON keeps only the "
                    f"last, which silently drops a setting; keep one {key!r}"
                )
            out[key] = value
        return out

    return hook


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(where))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; fix the "
            f"JSON syntax there (a trailing comma or a missing quote is the usual cause)"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config must be a JSON object, got {type(data).__name__}")
    return data


def read_config(source: Any) -> tuple[dict[str, Any], str]:
    """Return (raw dict, description of where it came from)."""
    if isinstance(source, dict):
        return dict(source), "config dict"
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.lstrip().startswith("{"):
            return _parse(text, "config string"), "config string"
        path = Path(text)
        if not path.is_file():
            raise ConfigError(
                f"config {text!r} is neither a JSON object string nor an existing file; pass a "
                f"dict, a JSON string or the path of a JSON file"
            )
        return _parse(path.read_text(), str(path)), str(path)
    raise ConfigError(
        f"config of type {type(source).__name__} is not supported; pass a dict, a JSON string or "
        f"a path to a JSON file"
    )
