"""Asynchronous tensor <-> file I/O for NVMe offload (ZeRO-Infinity's swap path).

``handle = aio.write(tensor, path)`` / ``aio.read(tensor, path)`` return at once; ``handle.wait()``
returns the byte count or raises :class:`AioError`. Each request is split into ``block_size`` pieces
served by ``thread_count x queue_depth`` workers (``single_submit`` keeps one piece in flight per
thread). ``overlap_events=False`` runs handles one after another instead of side by side. The
settings come from ``ds_core.config.AioConfig`` (the ``aio`` config section).

Two ops do the work: ``ds_ops::aio_pwrite`` and ``ds_ops::aio_pread``. Their pure-Python default
uses threads and ``os.pwrite``/``os.preadv`` (buffered I/O); the C++ CPU kernel (csrc/aio.cpp) adds
O_DIRECT where the file system allows it and falls back to buffered I/O where it does not.

Rules, checked before any byte moves: the tensor is contiguous and on the CPU; a read needs the file
to hold ``offset + tensor.nbytes`` bytes. A missing or short file, a size mismatch or an I/O error
raises — a read never leaves a tensor partly filled without saying so.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ds_core.errors import DSError

from . import build
from .registry import custom_op, register_kernel

__all__ = ["AioError", "AioHandle", "AsyncIO", "read", "write", "configure"]


class AioError(DSError, OSError):
    """A read or write could not be done as asked; the message names the file and the sizes."""


def _check_tensor(action: str, t: Tensor, path: str, offset: int) -> None:
    if t.device.type != "cpu":
        raise AioError(f"aio {action} {path}: tensor is on {t.device}; copy it to a (pinned) CPU "
                       "buffer first")
    if not t.is_contiguous():
        raise AioError(f"aio {action} {path}: tensor of shape {tuple(t.shape)} with stride {t.stride()} "
                       "is not contiguous; pass tensor.contiguous() (the bytes go to disk as laid out)")
    if offset < 0:
        raise AioError(f"aio {action} {path}: offset {offset} must be >= 0")


def _check_readable(path: str, offset: int, nbytes: int) -> None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise AioError(f"aio read {path}: no such file; was it written (and waited on) first?") from None
    if size < offset + nbytes:
        raise AioError(f"aio read {path}: the file has {size} bytes but the tensor needs {nbytes} bytes "
                       f"at offset {offset} (up to byte {offset + nbytes}); the file is short or the "
                       "tensor has the wrong size/dtype")


# ------------------------------------------------------------------------------------- the two ops


@custom_op("aio_pwrite", mutates_args=())
def aio_pwrite(src: Tensor, path: str, offset: int, block_size: int, workers: int, direct: bool,
               fsync: bool) -> int:
    """Write ``src``'s bytes to ``path`` at ``offset`` (creating it); returns the byte count."""
    _check_tensor("write", src, path, offset)
    return _py_transfer(True, src, path, offset, block_size, workers, fsync)


@custom_op("aio_pread", mutates_args=("dst",))
def aio_pread(dst: Tensor, path: str, offset: int, block_size: int, workers: int, direct: bool) -> int:
    """Fill ``dst`` from ``path`` at ``offset``; returns the byte count."""
    _check_tensor("read", dst, path, offset)
    _check_readable(path, offset, dst.nbytes)
    return _py_transfer(False, dst, path, offset, block_size, workers, False)


def _py_transfer(write: bool, t: Tensor, path: str, offset: int, block_size: int, workers: int,
                 sync: bool) -> int:
    nbytes = t.nbytes
    # the tensor's bytes without numpy (``t`` stays alive for the whole transfer)
    view = memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B") if nbytes else memoryview(b"")
    # a write at offset 0 replaces the file (like tensor.numpy().tofile); elsewhere it grows as needed
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0) if write else os.O_RDONLY
    fd = os.open(path, flags, 0o644)
    try:
        def one(start: int) -> None:
            piece = view[start:start + block_size]
            done = 0
            while done < len(piece):
                if write:
                    n = os.pwrite(fd, piece[done:], offset + start + done)
                else:
                    n = os.preadv(fd, [piece[done:]], offset + start + done)
                    if n == 0:
                        raise AioError(f"aio read {path}: short read at byte {offset + start + done}; "
                                       f"the file ended before {offset + nbytes} bytes")
                done += n

        starts = range(0, nbytes, block_size)
        if workers <= 1 or len(starts) <= 1:
            for s in starts:
                one(s)
        else:
            with ThreadPoolExecutor(min(workers, len(starts))) as pool:
                for fut in [pool.submit(one, s) for s in starts]:
                    fut.result()
        if write and sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return nbytes


def _pwrite_cpu(src, path, offset, block_size, workers, direct, fsync):
    _check_tensor("write", src, path, offset)
    ext = build.load_or_none("aio")
    if ext is None:
        return _py_transfer(True, src, path, offset, block_size, workers, fsync)
    try:
        return ext.pwrite(src.data_ptr(), src.nbytes, path, offset, block_size, workers, direct, fsync)
    except RuntimeError as exc:
        raise AioError(str(exc)) from None


def _pread_cpu(dst, path, offset, block_size, workers, direct):
    _check_tensor("read", dst, path, offset)
    _check_readable(path, offset, dst.nbytes)
    ext = build.load_or_none("aio")
    if ext is None:
        return _py_transfer(False, dst, path, offset, block_size, workers, False)
    try:
        return ext.pread(dst.data_ptr(), dst.nbytes, path, offset, block_size, workers, direct)
    except RuntimeError as exc:
        raise AioError(str(exc)) from None


aio_pwrite.register_fake(lambda *args, **kwargs: 0)
aio_pread.register_fake(lambda *args, **kwargs: 0)
register_kernel("aio_pwrite", "cpu", _pwrite_cpu, kernel="c++ jit (csrc/aio.cpp)",
                status=lambda: build.describe("aio"))
register_kernel("aio_pread", "cpu", _pread_cpu, kernel="c++ jit (csrc/aio.cpp)",
                status=lambda: build.describe("aio"))


# ------------------------------------------------------------------------------- handles and engine


class AioHandle:
    """One submitted read or write. ``wait()`` blocks and returns the byte count or raises."""

    def __init__(self, future: Future, action: str, path: str, tensor: Tensor):
        self._future = future
        self.action = action
        self.path = path
        self.tensor = tensor  # kept alive until the I/O is done

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        return self._future.result(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"AioHandle({self.action} {self.path}, {self.tensor.nbytes} bytes, {state})"


class AsyncIO:
    """Submits reads and writes under one ``AioConfig``; methods return :class:`AioHandle`."""

    def __init__(self, config: Any = None, *, direct: bool = True):
        from ds_core.config.sections import AioConfig

        if config is None:
            config = AioConfig()
        elif isinstance(config, dict):
            config = AioConfig(**config)
        self.config = config
        self.direct = direct
        per_thread = 1 if config.single_submit else config.queue_depth
        self.workers = config.thread_count * per_thread
        # handles in flight side by side: several when overlapping, else one after another
        self._pool = ThreadPoolExecutor(4 if config.overlap_events else 1, thread_name_prefix="ds-aio")

    def write(self, tensor: Tensor, path: str | os.PathLike, offset: int = 0, fsync: bool = False) -> AioHandle:
        """Start writing ``tensor``'s bytes to ``path`` at ``offset``; ``fsync`` adds fdatasync."""
        path = os.fspath(path)
        _check_tensor("write", tensor, path, offset)
        op = torch.ops.ds_ops.aio_pwrite
        fut = self._pool.submit(op, tensor, path, offset, self.config.block_size, self.workers,
                                self.direct, fsync)
        return AioHandle(fut, "write", path, tensor)

    def read(self, tensor: Tensor, path: str | os.PathLike, offset: int = 0) -> AioHandle:
        """Start filling ``tensor`` from ``path`` at ``offset``; the file must be long enough."""
        path = os.fspath(path)
        _check_tensor("read", tensor, path, offset)
        _check_readable(path, offset, tensor.nbytes)  # fail at submit time, not only at wait()
        op = torch.ops.ds_ops.aio_pread
        fut = self._pool.submit(op, tensor, path, offset, self.config.block_size, self.workers,
                                self.direct)
        return AioHandle(fut, "read", path, tensor)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


_default: AsyncIO | None = None
_default_lock = threading.Lock()


def configure(config: Any = None, *, direct: bool = True) -> AsyncIO:
    """Replace the engine behind :func:`read`/:func:`write` (e.g. with the run's ``aio`` section)."""
    global _default
    with _default_lock:
        old, _default = _default, AsyncIO(config, direct=direct)
    if old is not None:
        old.shutdown()
    return _default


def _engine() -> AsyncIO:
    with _default_lock:
        engine = _default
    return engine if engine is not None else configure()


def write(tensor: Tensor, path: str | Path, offset: int = 0, fsync: bool = False) -> AioHandle:
    """Start writing ``tensor`` to ``path``; ``.wait()`` on the handle."""
    return _engine().write(tensor, path, offset, fsync)


def read(tensor: Tensor, path: str | Path, offset: int = 0) -> AioHandle:
    """Start reading ``path`` into ``tensor``; ``.wait()`` on the handle."""
    return _engine().read(tensor, path, offset)
