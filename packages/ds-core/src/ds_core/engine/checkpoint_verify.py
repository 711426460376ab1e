"""Checking a checkpoint before it is loaded: the manifest's size and CRC-32 of every file, and
``meta.json`` against the protocol's schema. :func:`verify_checkpoint` checks one rank's share of the
files; ``checkpoint.resolve_tag`` splits the work across ranks and agrees on the outcome.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

from .checkpoint_files import MANIFEST, CheckpointError, available_tags, crc32_file, options, read_json

__all__ = ["FORMAT", "MANIFEST_FORMAT", "CheckpointDamaged", "damaged_message", "verify_checkpoint", "read_meta", "read_manifest", "digest",
           "verify_enabled"]

FORMAT = "ds-checkpoint-1"
MANIFEST_FORMAT = "ds-manifest-1"


def verify_enabled() -> bool:
    """``checkpoint_options(verify=...)`` when set, else ``DS_CHECKPOINT_VERIFY`` (default on)."""
    option = options().verify
    if option is not None:
        return option
    value = os.environ.get("DS_CHECKPOINT_VERIFY", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def digest(files: dict) -> str:
    return f"{zlib.crc32(json.dumps(files, sort_keys=True).encode()):08x}"


def _meta_model():
    from pydantic import BaseModel, ConfigDict, Field

    class CheckpointMeta(BaseModel):
        """What the protocol relies on in ``meta.json``; layouts add their own keys."""

        model_config = ConfigDict(extra="allow", strict=True)
        format: str
        aliases: dict[str, dict[str, str]] = Field(default_factory=dict)
        world_size: int = Field(1, ge=1)
        global_steps: int = Field(0, ge=0)
        global_samples: int = Field(0, ge=0)
        micro_steps: int = Field(0, ge=0)
        client_state: dict[str, Any] = Field(default_factory=dict)
        config: dict[str, Any] = Field(default_factory=dict)

    return CheckpointMeta


_META = None


def read_meta(path: Path) -> dict:
    """``path/meta.json``, checked against the protocol's schema; raise naming what is wrong."""
    global _META
    from pydantic import ValidationError

    file = Path(path) / "meta.json"
    meta = read_json(file)
    if _META is None:
        _META = _meta_model()
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} is damaged: it holds a JSON {type(meta).__name__}, not an object; restore "
                              f"it from a copy or load another tag")
    try:
        _META.model_validate(meta)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()[:5])
        raise CheckpointError(f"{file} is not a ds checkpoint's meta.json ({problems}); it is damaged or was "
                              f"written by something else: restore it from a copy or load another tag") from None
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{file}: format {meta['format']!r} is not {FORMAT!r}; it was written by another "
                              f"program or version")
    return meta


def read_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    manifest = read_json(file)
    ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
          and isinstance(manifest.get("files"), dict)
          and all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("crc32"), str)
                  for v in manifest["files"].values()))
    if not ok or manifest.get("digest") != digest(manifest["files"]):
        raise CheckpointError(f"{file} is damaged (its entries do not match its own digest); the checkpoint "
                              f"cannot be verified: restore it from a copy, load another tag, or load with "
                              f"verification off (DS_CHECKPOINT_VERIFY=0)")
    return manifest


def _share(files: dict[str, dict], rank: int, world: int) -> list[str]:
    """This rank's files to verify: largest first to the least loaded rank (same answer on every rank)."""
    load = [0] * world
    mine = []
    for name in sorted(files, key=lambda n: (-files[n]["bytes"], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += files[name]["bytes"] + 1
        if r == rank:
            mine.append(name)
    return mine


class CheckpointDamaged(CheckpointError):
    """Files of a checkpoint differ from what was saved; ``problems`` lists one line per file."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path, self.problems = Path(path), list(problems)
        super().__init__(damaged_message(self.path, self.problems))


def damaged_message(path: Path, problems: list[str]) -> str:
    return (f"checkpoint {path} is damaged: " + "; ".join(problems) + f". Restore it from a copy or load "
            f"another tag{available_tags(Path(path).parent)}; DS_CHECKPOINT_VERIFY=0 loads it unverified")


def verify_checkpoint(path: str | os.PathLike, rank: int = 0, world: int = 1) -> None:
    """Check ``path`` against its manifest: this rank's share of the files (all of them for one rank).

    Raises :class:`CheckpointDamaged` listing each missing, resized or changed file. A checkpoint
    saved before manifests existed is only schema-checked (with a warning). Does nothing when
    verification is off (:func:`verify_enabled`). No collective.
    """
    path = Path(path)
    if not verify_enabled():
        return
    manifest = read_manifest(path)
    if manifest is None:
        warnings.warn(f"{path} has no {MANIFEST} (saved by an older version): its files cannot be verified",
                      stacklevel=3)
        if (path / "meta.json").is_file():
            read_meta(path)
        return
    problems = []
    files = manifest["files"]
    for name in _share(files, rank, world):
        file = path / name
        entry = files[name]
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            size, crc = crc32_file(file, sync=False)
        except OSError as exc:
            problems.append(f"{name} cannot be read ({exc})")
            continue
        if size != entry["bytes"]:
            problems.append(f"{name} has {size} bytes, {entry['bytes']} were written (truncated or replaced)")
        elif crc != entry["crc32"]:
            problems.append(f"{name} differs from what was written (crc32 {crc}, saved {entry['crc32']}): its "
                            f"bytes were changed or damaged after the save")
        elif name == "meta.json":
            try:
                read_meta(path)
            except CheckpointError as exc:
                problems.append(str(exc).split(" is not a ds checkpoint's ", 1)[-1])
    if problems:
        raise CheckpointDamaged(path, problems)


