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
(the directory is created on first use). Each file starts with a 4 KiB header (magic, dtype, element
count). The ops replace a file when written at offset 0, so payload writes always land at offset
4096 or later and a partial update never truncates the rest; 4096 also keeps the payload aligned for
O_DIRECT.

[Note: swap files outlive no run] A store holds an exclusive ``flock`` on its ``<kind>-<pid>-<n>.lock``
beside its files for as long as it lives; the kernel drops the lock when the process dies, however it
dies (kill -9 included). Every new store first reclaims the files of every store whose lock is free —
runs that ended without cleaning up — under the same ``nvme_path``, and says so. Its own files go on
:meth:`SwapStore.close`, garbage collection, interpreter exit and SIGTERM (when nobody else handles
it: the files are removed, then the signal takes its default course).

A write that fails — disk full (ENOSPC), a device error (EIO), anything else — raises
:class:`SwapError` from ``wait()``, naming the file, the byte count and the fix. Callers keep their
in-memory copy until ``wait()`` has returned: nothing is dropped on the strength of an unconfirmed
write.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ds_core.errors import DSError
from ds_core.ops import get_op

__all__ = ["SwapError", "SwapHandle", "SwapStore", "HEADER_BYTES", "swap_dir", "py_pwrite", "py_pread",
           "reclaim_stale"]

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


def _cleanup(paths: set[str], directory: Path, lock: list) -> None:
    for p in list(paths):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        paths.discard(p)
    if lock:  # the lock file goes last: while it exists and is held, the files above are ours
        path, fd = lock.pop()
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
    for d in (directory, directory.parent):  # rank<r>/ then ds_zero_swap/, each only when empty
        try:
            d.rmdir()
        except OSError:
            break


_live: weakref.WeakSet = weakref.WeakSet()  # stores of this process, for the SIGTERM handler
_handler_installed = False
_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+-(?P<pid>\d+)-\d+)\.")


def _on_sigterm(signum, frame) -> None:
    for store in list(_live):
        store._finalizer()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # the default course: the process ends, killed by SIGTERM


def _install_sigterm_cleanup() -> None:
    """Remove swap files on SIGTERM too, unless the program handles SIGTERM itself (then it exits
    through its own path, and interpreter exit removes them)."""
    global _handler_installed
    if _handler_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    _handler_installed = True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale(root: str | os.PathLike) -> tuple[int, int]:
    """Remove the swap files of stores that are gone (their lock is free) under ``root/ds_zero_swap``.

    Files without a lock file (written before locks existed) go when the pid in their name is not a
    live process on this machine. Returns (files removed, bytes freed).
    """
    base = Path(root) / "ds_zero_swap"
    removed = freed = 0
    if not base.is_dir():
        return 0, 0
    for rank_dir in base.iterdir():
        if not rank_dir.is_dir():
            continue
        try:
            names = os.listdir(rank_dir)
        except OSError:
            continue
        locked_prefixes = {n[:-len(".lock")] for n in names if n.endswith(".lock")}
        stale: set[str] = set()
        for prefix in locked_prefixes:
            lock = rank_dir / f"{prefix}.lock"
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live store holds it
                continue
            stale.add(prefix)
            for name in names:
                if name.startswith(prefix + ".") and name.endswith(".swp"):
                    removed, freed = _remove(rank_dir / name, removed, freed)
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)
        for name in names:  # no lock file: written before locks existed, or a lock never renamed into place
            m = _NAME.match(name.lstrip("."))
            orphan = name.endswith(".swp") or (name.startswith(".") and name.endswith(".lock.tmp"))
            if orphan and m and m["prefix"] not in locked_prefixes and not _pid_alive(int(m["pid"])):
                removed, freed = _remove(rank_dir / name, removed, freed)
        try:
            rank_dir.rmdir()  # only when nothing is left (a store being set up retries its mkdir)
        except OSError:
            pass
    return removed, freed


def _remove(path: Path, removed: int, freed: int) -> tuple[int, int]:
    try:
        size = path.stat().st_size
        path.unlink()
    except OSError:
        return removed, freed
    return removed + 1, freed + size


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
        self._held: list = []  # [(lock file, fd)] once the directory exists
        self._finalizer = weakref.finalize(self, _cleanup, self._paths, self.dir, self._held)

    def path(self, name: str) -> str:
        return str(self.dir / f"{self.prefix}.{name}.swp")

    def _open_run(self) -> None:
        """First use: reclaim what dead runs left under this nvme_path, then take this store's lock."""
        root = self.dir.parent.parent
        files, freed = reclaim_stale(root)
        if files:
            warnings.warn(f"removed {files} NVMe swap file(s) ({freed / 2**20:.1f} MiB) under {root} left by runs "
                          f"that ended without cleaning up (killed or crashed)", RuntimeWarning, stacklevel=4)
        tmp = self.dir / f".{self.prefix}.lock.tmp"
        for attempt in range(10):  # another store's scan may remove the empty directory in between
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                break
            except FileNotFoundError:
                if attempt == 9:
                    raise
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until close; the kernel drops it if the process dies
        final = self.dir / f"{self.prefix}.lock"
        os.replace(tmp, final)  # appears already locked: no scan can take it for a dead run's
        self._held.append((str(final), fd))
        _live.add(self)
        _install_sigterm_cleanup()

    def create(self, name: str, numel: int, dtype: torch.dtype) -> str:
        """Create (or replace) file ``name`` for ``numel`` elements of ``dtype``: writes its header now."""
        if not self._held:
            self._open_run()
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
