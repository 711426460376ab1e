"""The watchdog: a rank that stops (SIGSTOP, a debugger, a frozen machine) is named within minutes.

A stopped rank is not a dead one: its sockets stay open, so its peers wait in their next collective
until the process-group timeout (30 minutes by default) and then fail with a transport error that
names nobody. A plain shorter timeout would also fail ranks that are only slow (rank 0 writing a
large checkpoint while the others wait in the commit). So every rank's watchdog thread beats a
heartbeat counter in the rendezvous store, and watches its neighbours' (ranks r-1 and r+1: every
rank is watched by two, at constant cost per rank). A rank that is slow keeps beating — the thread
runs beside the work — while a stopped one does not: when a neighbour's counter has not moved for
``timeout`` seconds, the watchdog writes what it knows to stderr — the silent rank, where it was
last seen, and what this rank is doing (the collective, from the main thread's Python stack) — and
ends this process with exit code :data:`EXIT_CODE`. The launcher then stops the job (torchrun stops
every rank when one fails), minutes after the stop instead of half an hour.

[Note: why the process ends] A gloo collective blocked on a stopped peer cannot be interrupted from
another thread (aborting the process group does not wake it), so no exception can reach the main
thread before the process-group timeout. The message is the diagnosis; the exit makes it prompt.

The timeout is ``DS_WATCHDOG_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT`; 0 turns the watchdog
off) or :func:`start`'s ``timeout``. A watchdog whose own thread was held up for half the timeout
(the whole job suspended, then resumed) forgets what it saw instead of blaming its neighbours.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

__all__ = ["Watchdog", "start", "stop", "current", "main_thread_activity", "DEFAULT_TIMEOUT", "EXIT_CODE", "ENV"]

DEFAULT_TIMEOUT = 300.0
EXIT_CODE = 124  # "timed out", as coreutils' timeout
ENV = "DS_WATCHDOG_TIMEOUT"

_current: Watchdog | None = None
_lock = threading.Lock()


_STDLIB = sysconfig.get_paths()["stdlib"].replace("\\", "/")


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor):])
    return "/".join(parts[-3:])


def main_thread_activity() -> str:
    """What the main thread is doing, from its Python stack: the collective it waits in, if any."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "has no main thread"
    stack = traceback.extract_stack(frame)
    del frame
    collective, caller = None, None
    for fs in reversed(stack):  # innermost first
        path = fs.filename.replace("\\", "/")
        if "/torch/distributed/" in path or path.endswith("ds_core/comm/collectives.py"):
            collective = fs.name  # keeps moving outwards: the public function wins over its helpers
            continue
        if "/torch/" in path or path.startswith("<") or (path.startswith(_STDLIB) and "-packages/" not in path):
            continue  # the place worth naming is the caller's, not torch's or the standard library's
        caller = fs
        break
    if caller is None and stack:
        caller = stack[-1]
    where = f"{_short(caller.filename)}:{caller.lineno} in {caller.name}" if caller else "an unknown place"
    if collective:
        return f"waits in the collective {collective} (called from {where})"
    if caller is not None and ".wait(" in (caller.line or ""):
        return f"waits for an asynchronous collective (work.wait() at {where})"
    return f"is at {where} (not in a collective)"


def _own_client(store):
    """A store client of our own with a short timeout, so a store that stops answering does not block
    the watchdog for the process group's timeout."""
    inner = store
    while isinstance(inner, dist.PrefixStore):
        inner = inner.underlying_store
    if isinstance(inner, dist.TCPStore):
        try:
            return dist.TCPStore(inner.host, inner.port, is_master=False,
                                 timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
        except Exception:  # noqa: BLE001 - fall back to the shared client
            return store
    return store


class Watchdog:
    """Heartbeats of this rank and watch over its neighbours; see the module docstring.

    ``on_stall(message)`` is called once when a neighbour stops (default: write it to stderr and end
    the process with :data:`EXIT_CODE`).
    """

    def __init__(self, store, rank: int, world: int, timeout: float, *, interval: float | None = None,
                 on_stall: Callable[[str], None] | None = None, prefix: str = "ds_watchdog/") -> None:
        self.store = dist.PrefixStore(prefix, _own_client(store))
        self.rank, self.world, self.timeout = rank, world, float(timeout)
        self.interval = interval or min(10.0, max(0.2, self.timeout / 10))
        self.peers = sorted({(rank + 1) % world, (rank - 1) % world} - {rank})
        self.on_stall = on_stall or _report_and_exit
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ds-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._beat()  # a first beat before anyone may look
        self._thread.start()
        return self

    def stop(self, done: bool = True) -> None:
        """Stop watching; ``done`` tells the neighbours this rank finished (its silence is no stall)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if done:
            try:
                self.store.add(f"{self.rank}/done", 1)
            except Exception:  # noqa: BLE001, S110 - the store may be gone already at exit
                pass

    def _beat(self) -> None:
        self.store.add(str(self.rank), 1)
        self.store.set(f"{self.rank}/where", f"{socket.gethostname()} pid {os.getpid()}: "
                                             f"{main_thread_activity()}")

    def _run(self) -> None:
        seen: dict[int, tuple[int, float]] = {}
        store_silent_since: float | None = None
        last = time.monotonic()
        while self.peers and not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last > self.timeout / 2:
                seen.clear()  # this process was held up itself (the job suspended): start over
                store_silent_since = None
            last = now
            try:
                self._beat()
                counts = {p: self.store.add(str(p), 0) for p in self.peers}
                store_silent_since = None
            except Exception as exc:  # noqa: BLE001 - a store that does not answer is itself a finding
                if time.monotonic() - now < 5:
                    return  # refused at once: the store's host has exited (the job is ending), no stall
                store_silent_since = store_silent_since or now
                if now - store_silent_since > self.timeout:
                    self._fire(f"the rendezvous store has not answered for {now - store_silent_since:.0f} s "
                               f"({type(exc).__name__}: {exc}): the process that hosts it (rank 0, or the "
                               f"launcher's agent) is stopped or its machine is unreachable")
                    return
                continue
            for peer, count in counts.items():
                if peer not in seen or seen[peer][0] != count:
                    seen[peer] = (count, now)
            for peer, (_, since) in list(seen.items()):
                if now - since <= self.timeout:
                    continue
                state = self._state(peer)
                if state in ("done", "gone"):  # finished or exited: nothing more to watch
                    self.peers.remove(peer)
                    del seen[peer]
                    continue
                if state == "running":  # alive on this machine, only its heartbeat is late: look again later
                    seen[peer] = (seen[peer][0], now)
                    continue
                self._fire(f"rank {peer} has not answered for {now - since:.0f} s: it is {state}. Rank {peer} "
                           f"was last seen on {self._where(peer)}")
                return

    def _state(self, peer: int) -> str:
        """``done`` (it said so), ``gone``/``running``/``stopped (...)`` (a process on this machine, from
        /proc), or a description of what a silent rank on another machine may be."""
        try:
            if self.store.add(f"{peer}/done", 0):
                return "done"
        except Exception:  # noqa: BLE001, S110 - then judge by what follows
            pass
        where = self._where(peer)
        host, _, rest = where.partition(" pid ")
        pid = rest.split(":", 1)[0]
        if host == socket.gethostname() and pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                return "gone"
            if state in ("T", "t"):
                return "stopped (SIGSTOP, or a debugger holding every thread)"
            if state == "Z":
                return "gone"
            return "running"
        return "stopped (SIGSTOP, a debugger holding every thread), frozen, or its machine is unreachable"

    def _where(self, peer: int) -> str:
        try:
            return self.store.get(f"{peer}/where").decode(errors="replace")
        except Exception:  # noqa: BLE001 - best effort
            return "(unknown)"

    def _fire(self, finding: str) -> None:
        self.fired = True
        message = (f"[ds watchdog] rank {self.rank} ({socket.gethostname()} pid {os.getpid()}): {finding}. This "
                   f"rank {main_thread_activity()}. Ending this rank so the job stops now instead of at the "
                   f"process-group timeout; set {ENV} (seconds, 0 = off; now {self.timeout:g}) if a rank may "
                   f"legitimately be stopped for longer.")
        self.on_stall(message)


def _report_and_exit(message: str) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110 - the message below matters more
        pass
    os.write(2, (message + "\n").encode())
    os._exit(EXIT_CODE)


def _timeout_from_env() -> float:
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        from ..errors import CommError

        raise CommError(f"{ENV}={raw!r} is not a number of seconds; set it to e.g. 300, or 0 to turn the "
                        f"watchdog off") from None
    return value


def start(timeout: float | None = None, **kwargs) -> Watchdog | None:
    """Start this process's watchdog over the default process group (once; later calls return it).

    Does nothing (returns None) in a one-process world, without a rendezvous store, or with a
    timeout of 0 (``DS_WATCHDOG_TIMEOUT=0``).
    """
    global _current
    with _lock:
        if _current is not None:
            return _current
        if not (dist.is_available() and dist.is_initialized()):
            return None
        timeout = _timeout_from_env() if timeout is None else float(timeout)
        world = dist.get_world_size()
        if timeout <= 0 or world < 2:
            return None
        try:
            store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, ValueError, AttributeError):
            return None
        inner = store
        while isinstance(inner, dist.PrefixStore):
            inner = inner.underlying_store
        if isinstance(inner, dist.HashStore):
            return None  # ranks in one process (the test harness's threads): nobody to lose
        _current = Watchdog(store, dist.get_rank(), world, timeout, **kwargs).start()
        atexit.register(stop)  # a rank that exits normally says so
        return _current


def stop(done: bool = True) -> None:
    """Stop this process's watchdog (before the process group is destroyed); ``done``: tell the
    neighbours this rank finished, so its silence from now on is not taken for a stall."""
    global _current
    with _lock:
        if _current is not None:
            _current.stop(done)
            _current = None


def current() -> Watchdog | None:
    return _current
