"""NVMe tensor store: tensors written to files and read back asynchronously (ZeRO-Infinity's swap path).

ZeRO-Infinity (Rajbhandari et al. 2021, "ZeRO-Infinity: Breaking the GPU Memory Wall for Extreme
Scale Deep Learning", section 5) keeps what does not fit in memory — optimizer state, parameters —
on NVMe between uses and overlaps the transfers with compute. This module is the storage half:
:class:`SwapStore` writes a tensor's bytes into a file region and reads them back, returning a
:class:`SwapHandle` at once; ``handle.wait()`` returns the byte count or raises :class:`SwapError`.
``swap_optimizer.py`` (optimizer state, streamed in sub-groups) and ``stage3.py`` (parameter shards)
decide what moves when.

The bytes move through ds-core's op seam: ``get_op("aio_pwrite")`` / ``get_op("aio_pread")`` are
ds-ops' kernels when that package is installed (C++ with O_DIRECT where the file system allows it)
and the pure-Python defaults below (``os.pwrite``/``os.preadv``) when it is not; a small thread pool
runs the calls so that compute continues while they are in flight.

Layout: every store owns files ``<nvme_path>/ds_zero_swap/rank<r>/<kind>-<pid>-<n>.<name>.swp``
(the directory is created on first use; :meth:`SwapStore.close`, garbage collection or interpreter
exit removes the files, and the directories once empty). Each file starts with a 4 KiB header
(magic, dtype, element count). The ops replace a file when written at offset 0, so payload writes
always land at offset 4096 or later and a partial update never truncates the rest; 4096 also keeps
the payload aligned for O_DIRECT.

A write that fails — disk full (ENOSPC), a device error (EIO), anything else — raises
:class:`SwapError` from ``wait()``, naming the file, the byte count and the fix. Callers keep their
in-memory copy until ``wait()`` has returned: nothing is dropped on the strength of an unconfirmed
write.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import shutil
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ds_core.errors import DSError
from ds_core.ops import get_op

__all__ = ["SwapError", "SwapHandle", "SwapStore", "HEADER_BYTES", "swap_dir", "py_pwrite", "py_pread"]

HEADER_BYTES = 4096
MAGIC = "ds_zero swap v1"
_ids = itertools.count()


class SwapError(DSError, OSError):
    """An NVMe swap read or write failed; the message names the file, the byte count and the fix.
    ``errno`` (e.g. ``errno.ENOSPC``) and ``filename`` are set when known."""

    def __init__(self, message: str, code: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno, self.filename = code, path

    def __str__(self) -> str:
        return self.message


def swap_dir(nvme_path: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` keeps its swap files under ``nvme_path``."""
    return Path(nvme_path) / "ds_zero_swap" / f"rank{rank}"


# -------------------------------------------------------------------- pure-Python default ops


def _bytes(t: torch.Tensor) -> memoryview:
    """The contiguous tensor's bytes, writable, without numpy (the caller keeps ``t`` alive)."""
    if not t.nbytes:
        return memoryview(b"")
    return memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())).cast("B")


def py_pwrite(src: torch.Tensor, path: str, offset: int, block_size: int, workers: int, direct: bool,
              fsync: bool) -> int:
    """``aio_pwrite``'s contract with ``os.pwrite`` (buffered; a write at offset 0 replaces the file)."""
    view = _bytes(src)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0), 0o644)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:done + block_size], offset + done)
        if fsync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return len(view)


def py_pread(dst: torch.Tensor, path: str, offset: int, block_size: int, workers: int, direct: bool) -> int:
    """``aio_pread``'s contract with ``os.preadv``: fill ``dst`` completely or raise."""
    view = _bytes(dst)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:done + block_size]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"short read: {path} ended at byte {offset + done}, "
                                         f"{offset + len(view)} needed")
            done += n
    finally:
        os.close(fd)
    return len(view)


# -------------------------------------------------------------------------------- handles


class SwapHandle:
    """One submitted read or write; ``wait()`` returns the byte count or raises :class:`SwapError`."""

    def __init__(self, future: Future, action: str, path: str, tensor: torch.Tensor) -> None:
        self._future = future
        self.action, self.path = action, path
        self.tensor = tensor  # kept alive until the I/O is done

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> int:
        return self._future.result()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SwapHandle({self.action} {self.path}, {self.tensor.nbytes} bytes, {state})"


def wait_all(handles) -> None:
    """Wait for every handle (even after a failure, so no I/O is left running); raise the first error."""
    first = None
    for h in handles:
        if h is None:
            continue
        try:
            h.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the rest finished
            first = first or exc
    if first is not None:
        raise first


def _explain(action: str, path: str, nbytes: int, exc: BaseException, config_key: str) -> tuple[int | None, str]:
    """(errno, message) for a failed transfer: what failed, how big, and what to do about it."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None and "No space left" in text:
        code = errno.ENOSPC
    elif code is None and "Input/output error" in text:
        code = errno.EIO
    head = f"NVMe swap {action} of {nbytes} bytes {'to' if action == 'write' else 'from'} {path} failed"
    if code == errno.ENOSPC:
        try:
            free = f"{shutil.disk_usage(os.path.dirname(path)).free} bytes free"
        except OSError:
            free = "free space unknown"
        return code, (f"{head}: no space left on device ({free} there). Free space on that file system or "
                      f"point {config_key}.nvme_path to a disk with room for the swap files; the data is "
                      f"still in memory but this step did not complete: reload the last checkpoint to go on")
    if code == errno.EIO:
        return code, (f"{head}: the device reported an I/O error ({text}). Check the disk (dmesg, smartctl) "
                      f"or point {config_key}.nvme_path to another one, then reload the last checkpoint")
    return code, (f"{head}: {text}. Check that {os.path.dirname(path)} is on a writable local disk with room "
                  f"for the swap files ({config_key}.nvme_path)")


# --------------------------------------------------------------------------------- the store


def _cleanup(paths: set[str], directory: Path) -> None:
    for p in list(paths):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        paths.discard(p)
    for d in (directory, directory.parent):  # rank<r>/ then ds_zero_swap/, each only when empty
        try:
            d.rmdir()
        except OSError:
            break


class SwapStore:
    """Named files of one dtype each under ``<nvme_path>/ds_zero_swap/rank<rank>/``; see the module docstring.

    ``kind`` prefixes the file names (``optimizer``, ``param``); ``config_key`` is the config section
    named in error messages; ``aio`` is the ``aio`` config section (block size, threads, queue depth)
    or None for its defaults; ``threads`` I/O calls run side by side (a read and a write at least).
    """

    def __init__(self, nvme_path: str | os.PathLike, rank: int, kind: str, config_key: str,
                 aio=None, threads: int = 2) -> None:
        self.dir = swap_dir(nvme_path, rank)
        self.prefix = f"{kind}-{os.getpid()}-{next(_ids)}"
        self.config_key = config_key
        self.block_size = getattr(aio, "block_size", 1 << 20)
        per_thread = 1 if getattr(aio, "single_submit", False) else getattr(aio, "queue_depth", 8)
        self.workers = max(1, getattr(aio, "thread_count", 1) * per_thread)
        self.write_op = get_op("aio_pwrite", default=py_pwrite)
        self.read_op = get_op("aio_pread", default=py_pread)
        self.files: dict[str, tuple[torch.dtype, int]] = {}
        self._threads = max(2, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._finalizer = weakref.finalize(self, _cleanup, self._paths, self.dir)

    def path(self, name: str) -> str:
        return str(self.dir / f"{self.prefix}.{name}.swp")

    def create(self, name: str, numel: int, dtype: torch.dtype) -> str:
        """Create (or replace) file ``name`` for ``numel`` elements of ``dtype``: writes its header now."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        header = json.dumps({"magic": MAGIC, "dtype": str(dtype), "numel": int(numel)}).encode()
        buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        buf[:len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        self._paths.add(path)
        self._submit("write", self.write_op, buf, path, 0).wait()
        self.files[name] = (dtype, int(numel))
        return path

    def _check(self, name: str, t: torch.Tensor, offset: int) -> str:
        if name not in self.files:
            raise DSError(f"swap file {name!r} was not created in {self.dir}; call create() first")
        dtype, numel = self.files[name]
        if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise DSError(f"swap file {name!r} holds contiguous host {dtype}; got {t.dtype} on {t.device} "
                          f"(contiguous: {t.is_contiguous()})")
        if offset < 0 or offset + t.numel() > numel:
            raise DSError(f"swap file {name!r} holds {numel} elements; elements [{offset}, "
                          f"{offset + t.numel()}) are outside it")
        return self.path(name)

    def write(self, name: str, tensor: torch.Tensor, offset: int = 0) -> SwapHandle:
        """Start writing ``tensor`` at element ``offset`` of file ``name``; keep ``tensor`` until waited."""
        path = self._check(name, tensor, offset)
        return self._submit("write", self.write_op, tensor, path, HEADER_BYTES + offset * tensor.element_size())

    def read(self, name: str, tensor: torch.Tensor, offset: int = 0) -> SwapHandle:
        """Start filling ``tensor`` from element ``offset`` of file ``name``."""
        path = self._check(name, tensor, offset)
        return self._submit("read", self.read_op, tensor, path, HEADER_BYTES + offset * tensor.element_size())

    def _submit(self, action: str, op, tensor: torch.Tensor, path: str, byte_offset: int) -> SwapHandle:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="ds-zero-swap")
            pool = self._pool
        key = self.config_key

        def run() -> int:
            try:
                if action == "write":
                    return int(op(tensor, path, byte_offset, self.block_size, self.workers, True, False))
                return int(op(tensor, path, byte_offset, self.block_size, self.workers, True))
            except (OSError, RuntimeError) as exc:
                code, message = _explain(action, path, tensor.nbytes, exc, key)
                raise SwapError(message, code, path) from exc

        return SwapHandle(pool.submit(run), action, path, tensor)

    def nbytes_on_disk(self) -> int:
        """Bytes in this store's files now (what the swap occupies on the disk)."""
        return sum(os.path.getsize(p) for p in self._paths if os.path.exists(p))

    def close(self) -> None:
        """Finish pending I/O, then remove this store's files (and the directories once empty)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._finalizer()
