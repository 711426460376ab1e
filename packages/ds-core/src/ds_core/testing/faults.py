"""Faults on demand, for tests of what a run does when the machine misbehaves.

- :func:`failing_safetensors_writes`: make ``safetensors.torch.save_file`` raise what it raises on a
  full disk (its own ``SafetensorError``, not an ``OSError``) for the files you pick, in this
  process — wherever a module imported the function from.
- :func:`mounted_tmpfs`: a real, small tmpfs (needs root and ``mount``; raises :class:`Unavailable`
  otherwise, which the ``tmpfs`` fixture of the pytest plugin turns into a skip with the reason).
- :func:`fill_disk`: fill a file system until only ``leave`` bytes are free.
- :func:`run_python`: run code in a fresh interpreter (for kill -9 / SIGSTOP scenarios) and return
  its exit status and output.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Unavailable", "failing_safetensors_writes", "mounted_tmpfs", "fill_disk", "run_python",
           "ENOSPC_MESSAGE"]

# What safetensors raises on a full disk (0.4 - 0.8): its own exception type with the OS error inside.
ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"


class Unavailable(RuntimeError):
    """The fault cannot be staged on this machine (e.g. mounting needs root); the message says why."""


@contextmanager
def failing_safetensors_writes(when: Callable[[str], bool] = lambda path: True,
                               message: str = ENOSPC_MESSAGE) -> Iterator[list[str]]:
    """Inside the block, ``save_file(tensors, path)`` raises ``SafetensorError(message)`` when
    ``when(path)``; yields the list of paths that failed. Every module-level binding of the function
    is replaced (``from safetensors.torch import save_file`` copies it into the importing module)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file
    failed: list[str] = []

    def save_file(tensors, filename, metadata=None):
        if when(str(filename)):
            failed.append(str(filename))
            raise SafetensorError(message)
        return real(tensors, filename, metadata=metadata)

    patched = [m for m in list(sys.modules.values())
               if m is not None and getattr(m, "save_file", None) is real]
    for module in patched:
        module.save_file = save_file
    try:
        yield failed
    finally:
        for module in patched:
            module.save_file = real


@contextmanager
def mounted_tmpfs(size: str = "4m", parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (mount's syntax: ``512k``, ``4m``) mounted on a new directory."""
    if os.geteuid() != 0:
        raise Unavailable("mounting a tmpfs needs root (this process runs as uid "
                          f"{os.geteuid()}); run the test as root to stage a real full disk")
    mount = shutil.which("mount")
    if mount is None:
        raise Unavailable("no 'mount' command on PATH to stage a real full disk")
    where = Path(tempfile.mkdtemp(prefix="ds-tmpfs-", dir=parent))
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        raise Unavailable(f"mount -t tmpfs failed ({done.stderr.strip() or done.returncode}): the container "
                          f"or machine does not allow mounting")
    try:
        yield where
    finally:
        subprocess.run([shutil.which("umount") or "umount", "-l", str(where)], capture_output=True)
        try:
            where.rmdir()
        except OSError:
            pass


def fill_disk(directory: str | os.PathLike, leave: int = 0, name: str = ".ds-filler") -> Path:
    """Write ``directory/name`` until the file system has about ``leave`` bytes free; returns the file."""
    path = Path(directory) / name
    block = b"\0" * (64 << 10)
    with open(path, "wb") as f:
        try:
            while True:
                free = shutil.disk_usage(directory).free
                if free <= leave:
                    break
                f.write(block[:max(1, min(len(block), free - leave))])
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return path


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 300,
               cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this one's executable); returns the completed process."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)
