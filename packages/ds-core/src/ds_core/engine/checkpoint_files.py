"""Files of a checkpoint: writing them (checksummed inside the protocol), reading them with errors
that name the file, and what a failed write means for the user (a full disk, a quota, a read-only
file system). Used by the directory protocol in ``checkpoint.py``.
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import shutil
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import DSError

__all__ = ["CheckpointError", "CheckpointWriteError", "MANIFEST", "write_atomic_text", "write_json",
           "tensors_to_safetensors", "read_json", "load_safetensors", "crc32_file", "fsync_dir",
           "committed", "available_tags", "explain_write", "human_bytes", "Writer", "watch_partial",
           "checkpoint_options", "options"]

MANIFEST = "manifest.json"
_CHUNK = 16 << 20


# -- options -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    save_latest: bool = True
    verify: bool | None = None  # None: DS_CHECKPOINT_VERIFY, default on


_options: contextvars.ContextVar[_Options | None] = contextvars.ContextVar("ds_checkpoint_options", default=None)


def _opts() -> _Options:
    return _options.get() or _Options()


@contextmanager
def checkpoint_options(*, save_latest: bool | None = None, verify: bool | None = None) -> Iterator[None]:
    """Options for the saves and loads inside the block (every layout reads them from the protocol).

    ``save_latest=False``: a save leaves ``latest`` as it is. ``verify=False``: a load skips the
    checksums (the environment variable ``DS_CHECKPOINT_VERIFY=0`` does the same everywhere).
    """
    current = _opts()
    token = _options.set(replace(current, **{k: v for k, v in (("save_latest", save_latest),
                                                                   ("verify", verify)) if v is not None}))
    try:
        yield
    finally:
        _options.reset(token)


def options() -> _Options:
    """The options in effect (see :func:`checkpoint_options`)."""
    return _opts()


class CheckpointError(DSError, RuntimeError):
    """A checkpoint cannot be written, is damaged, or does not fit the model being loaded."""


class CheckpointWriteError(CheckpointError):
    """Writing one file of a checkpoint failed; ``path`` names it, ``errno`` is set when known."""

    def __init__(self, message: str, path: Path, code: int | None = None) -> None:
        super().__init__(message)
        self.path, self.errno = path, code


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            return f"{human_bytes(shutil.disk_usage(p).free)} free on that file system"
        except OSError:
            continue
    return "free space unknown"


def _errno_of(exc: BaseException) -> int | None:
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    text = str(exc)
    for number, needles in ((errno.ENOSPC, ("No space left", "os error 28", "StorageFull")),
                            (errno.EDQUOT, ("quota exceeded", "os error 122")),
                            (errno.EROFS, ("Read-only file system", "os error 30")),
                            (errno.EACCES, ("Permission denied", "os error 13")),
                            (errno.EIO, ("Input/output error", "os error 5"))):
        if any(n.lower() in text.lower() for n in needles):
            return number
    return None


def explain_write(path: Path, exc: BaseException, nbytes: int | None = None) -> CheckpointWriteError:
    code = _errno_of(exc)
    size = f" ({human_bytes(nbytes)})" if nbytes else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if code == errno.ENOSPC else "the disk quota is exceeded"
        text = (f"{what} writing {path}{size}: {_free_space(path.parent)}; free space there or pass a "
                f"save_dir on a file system with room")
    elif code in (errno.EROFS, errno.EACCES):
        text = f"cannot write {path}{size}: {exc}; pass a save_dir this process may write to"
    elif code == errno.EIO:
        text = f"the device reported an I/O error writing {path}{size} ({exc}); check the disk, then save again"
    else:
        text = f"writing {path}{size} failed: {type(exc).__name__}: {exc}"
    return CheckpointWriteError(text, path, code)


def crc32_file(path: Path, sync: bool) -> tuple[int, str]:
    """(size, crc32 as 8 hex digits) of a file, read in chunks; fsync it first when ``sync``."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


class Writer:
    """What this rank wrote into one partial directory: ``relative name -> {bytes, crc32}``."""

    def __init__(self, partial: Path) -> None:
        self.partial = partial
        self.files: dict[str, dict[str, Any]] = {}


_writers: dict[Path, Writer] = {}
_writers_lock = threading.Lock()


@contextmanager
def watch_partial(partial: Path) -> Iterator[Writer]:
    """While inside, files written here by :func:`tensors_to_safetensors` / :func:`write_json` under
    ``partial`` are fsynced and checksummed into the returned :class:`Writer`."""
    writer = Writer(partial)
    with _writers_lock:
        _writers[partial] = writer
    try:
        yield writer
    finally:
        with _writers_lock:
            _writers.pop(partial, None)


def _record(path: Path) -> None:
    """Checksum (and fsync) a file just written inside an active partial directory."""
    path = Path(path)
    with _writers_lock:
        writer = next((w for p, w in _writers.items() if path.parent == p or p in path.parents), None)
    if writer is None:
        return
    try:
        size, crc = crc32_file(path, sync=True)
    except OSError as exc:
        raise explain_write(path, exc) from exc
    writer.files[path.relative_to(writer.partial).as_posix()] = {"bytes": size, "crc32": crc}


def write_atomic_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise explain_write(path, exc, len(text.encode())) from exc


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write JSON into a checkpoint file (checksummed when inside a partial directory)."""
    path = Path(path)
    try:
        text = json.dumps(obj, indent=indent)
    except (TypeError, ValueError) as exc:
        raise CheckpointWriteError(f"cannot write {path}: a value is not JSON ({exc})", path) from exc
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise explain_write(path, exc, len(text)) from exc
    _record(path)


def tensors_to_safetensors(tensors: dict[str, torch.Tensor], path: Path, *, dedupe: bool = True,
                           metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Save tensors; tensors sharing storage (tied weights) are stored once. Returns the aliases.

    ``dedupe=False`` stores every name (a file for readers that know nothing of aliases). Any error
    becomes a :class:`CheckpointWriteError` naming the file (safetensors raises its own type).
    """
    path = Path(path)
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        key = (ptr, t.storage_offset(), tuple(t.shape), t.dtype) if ptr is not None else None
        if dedupe and key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        shares = ptr is not None and ptr in storages  # safetensors refuses two names on one storage
        if ptr is not None:
            storages.add(ptr)
        whole = t.is_contiguous() and not t.storage_offset() and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        unique[name] = t.cpu() if whole and not shares else t.contiguous().cpu().clone()
    nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    try:
        save_file(unique, str(path), metadata=metadata)
    except Exception as exc:  # safetensors' SafetensorError is not an OSError
        path.unlink(missing_ok=True)
        raise explain_write(path, exc, nbytes) from exc
    _record(path)
    return aliases


def read_json(path: Path) -> Any:
    """Read a JSON file of a checkpoint; a damaged one raises :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: load another tag") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged: not readable JSON ({exc}); restore it from a copy or load "
                              f"another tag") from None


def load_safetensors(path: Path, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file of a checkpoint; a damaged one raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: load another tag")
    try:
        out = load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, a damaged header's ValueError
        raise CheckpointError(f"{path} is damaged: not a readable safetensors file ({exc}); restore it "
                              f"from a copy or load another tag") from None
    for name, target in (aliases or {}).items():
        if target not in out:
            raise CheckpointError(f"{path} lacks {target!r}, which {name!r} is saved as; the checkpoint is "
                                  f"damaged: load another tag")
        out[name] = out[target]
    return out




def committed(path: Path) -> bool:
    """A complete checkpoint: its manifest (or, saved before manifests, its meta.json) exists."""
    return (path / MANIFEST).is_file() or (path / "meta.json").is_file()


def available_tags(root: Path) -> str:
    try:
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and committed(p))
    except OSError:
        return ""
    return f" (complete checkpoints there: {', '.join(tags[:10])})" if tags else " (no complete checkpoint there)"


