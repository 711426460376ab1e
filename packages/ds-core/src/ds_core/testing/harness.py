"""Run a function on N ranks: real processes over gloo, or threads over torch's in-process group.

Process mode forks workers from a forkserver that has torch preloaded (fast start, no inherited
OpenMP state). Every rank's exception is returned with its traceback; a rank that does not finish
within ``timeout`` seconds (a hung collective, usually) fails the run and all workers are killed.

[Note: ranks are held together] The ranks meet in a file store in a fresh temporary directory (no
TCP port is picked, so runs in parallel never collide) and pass a barrier once their process group
is up, so no test body starts before every rank's gloo mesh is connected. After the body each rank
reports its result, then waits (on the store, not on gloo, so a rank that failed mid-collective
does not pair with a peer's pending one) until every rank is done or the run is being stopped;
only then does any rank destroy its process group. A rank can thus never tear down its group — and
its sockets — while a peer still needs them.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["run_distributed", "DistributedTestError", "free_port", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = float(os.environ.get("DS_TEST_TIMEOUT", 180))


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung; the message holds each rank's traceback."""


def free_port() -> int:
    """A TCP port free right now (another process may take it before you do: prefer a file store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def _hold_together(store, world_size: int, wait_s: float) -> None:
    """The teardown barrier, on the store: count this rank in, wait for the others (bounded)."""
    if store is None:
        return
    try:
        store.add("ds_test/done", 1)
        deadline = time.monotonic() + wait_s
        while store.add("ds_test/done", 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # noqa: BLE001, S110 - a broken store must not hide the test's own result
        pass


def _worker(fn, rank, world_size, rendezvous, backend, args, kwargs, env, conn, timeout):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share this machine's cores
    store = None
    try:
        store = dist.FileStore(rendezvous, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        dist.barrier()  # every rank's mesh is connected before any body runs
        result = fn(*args, **kwargs)
        conn.send(("ok", result))
    except BaseException as exc:  # report everything, including assertion errors
        result = None
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        _hold_together(store, world_size, min(timeout, 120.0))
        from ..comm import watchdog

        watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        # Tensors travel as shared memory served by this process: stay until the parent has them.
        if result is not None and conn.poll(60):
            conn.recv()
        conn.close()


def _run_processes(fn, world_size, args, kwargs, timeout, backend, env):
    ctx = _context()
    rendezvous_dir = tempfile.mkdtemp(prefix="ds-rendezvous-")
    rendezvous = os.path.join(rendezvous_dir, "store")
    try:
        return _run_in(ctx, rendezvous, fn, world_size, args, kwargs, timeout, backend, env)
    finally:
        shutil.rmtree(rendezvous_dir, ignore_errors=True)


def _run_in(ctx, rendezvous, fn, world_size, args, kwargs, timeout, backend, env):
    pipes, procs = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker, name=f"rank{rank}",
                           args=(fn, rank, world_size, rendezvous, backend, args, kwargs, env, child, timeout))
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)

    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    first_error_at: float | None = None
    while len(results) < world_size and time.monotonic() < deadline:
        for rank, pipe in enumerate(pipes):
            if rank in results:
                continue
            if pipe.poll(0.05):
                try:
                    results[rank] = pipe.recv()
                    if results[rank][0] == "ok":
                        try:
                            pipe.send("received")  # the worker may let go of shared tensors now
                        except OSError:
                            pass  # it already exited
                except EOFError:
                    results[rank] = ("error", f"rank {rank} exited (code {procs[rank].exitcode}) "
                                              f"without reporting")
                if results[rank][0] == "error" and first_error_at is None:
                    first_error_at = time.monotonic()
            elif not procs[rank].is_alive() and not pipe.poll(0):
                results[rank] = ("error", f"rank {rank} died with exit code {procs[rank].exitcode}")
                first_error_at = first_error_at or time.monotonic()
        # peers of a failed rank usually block in a collective: give them a moment, then stop
        if first_error_at is not None and time.monotonic() - first_error_at > 5:
            break
    for proc in procs:
        proc.join(timeout=10 if len(results) == world_size else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return _collect(results, world_size, timeout, first_error_at is not None)


def _collect(results, world_size, timeout, had_error):
    errors = [f"--- rank {r} ---\n{payload}" for r, (status, payload) in sorted(results.items())
              if status == "error"]
    missing = [r for r in range(world_size) if r not in results]
    if missing and not had_error:
        errors.append(f"rank(s) {missing} did not finish within {timeout:.0f} s: a hung collective "
                      f"(ranks disagreeing on the sequence of collectives) is the usual cause")
    elif missing:
        errors.append(f"rank(s) {missing} were stopped after another rank failed")
    if errors:
        raise DistributedTestError("\n".join(errors))
    return [results[r][1] for r in range(world_size)]


def _run_threads(fn, world_size, args, kwargs, timeout):
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.multi_threaded_pg import (
        _install_threaded_pg,
        _uninstall_threaded_pg,
    )

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    world = _install_threaded_pg()
    store = dist.HashStore()
    results: dict[int, tuple[str, Any]] = {}

    def worker(rank: int) -> None:
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
            results[rank] = ("ok", fn(*args, **kwargs))
        except BaseException as exc:
            results[rank] = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        finally:
            if world == dist.distributed_c10d._world and dist.is_initialized():
                dist.destroy_process_group()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    finally:
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    return _collect(results, world_size, timeout, any(s == "error" for s, _ in results.values()))


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *, args: tuple = (),
                    kwargs: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT,
                    backend: str = "gloo", mode: str = "process",
                    env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return each rank's result.

    ``mode="process"``: real processes, a real gloo group, torchrun-style variables set (the default
    and what proves distributed behaviour). ``mode="thread"``: threads over torch's in-process
    group, for fast logic tests. ``fn`` must be importable (module level) in process mode.
    """
    if world_size < 1:
        raise ValueError(f"world_size {world_size} must be >= 1")
    kwargs = kwargs or {}
    if mode == "process":
        return _run_processes(fn, world_size, args, kwargs, timeout, backend, env or {})
    if mode == "thread":
        return _run_threads(fn, world_size, args, kwargs, timeout)
    raise ValueError(f"mode {mode!r} must be 'process' or 'thread'")


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("ds_core.testing needs a POSIX system (forkserver)")
