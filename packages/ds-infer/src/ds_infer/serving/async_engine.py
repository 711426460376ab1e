"""The engine on its own thread, and an asyncio face for the HTTP handlers.

One thread owns the :class:`~ds_infer.serving.engine.LLMEngine` and loops: take the new requests and
aborts from the inbox, run a step, hand every update to the asyncio queue of its request. Handlers
``await`` those queues, so the event loop never blocks on a forward (PyTorch releases the GIL in its
kernels). An abort (client gone, timeout, error) is applied before the next forward, so its blocks
are free for that forward.

[Note: bounded queue] A request is refused (429) when the requests waiting for admission — in the
inbox or in the scheduler's queue — already number ``max_queue_size``; counted under the inbox
lock, so concurrent handlers cannot overshoot it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import LLMEngine
from .outputs import SequenceUpdate
from .sampling_params import SamplingParams

__all__ = ["AsyncEngine", "QueueFullError", "EngineDeadError", "RequestFailedError"]

log = logging.getLogger("ds_infer.serving")


class QueueFullError(RuntimeError):
    """The admission queue is full; ``retry_after`` suggests when to come back (seconds)."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down); the request cannot be served."""


class RequestFailedError(RuntimeError):
    """A step failed while the request was in flight; it was aborted, the engine serves on."""


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, choices: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open_choices = choices

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class AsyncEngine:
    """Runs ``engine`` on a thread; ``generate`` is an async iterator of a request's updates."""

    def __init__(self, engine: LLMEngine, *, max_queue_size: int, retry_after=None) -> None:
        self.engine = engine
        self.max_queue_size = max_queue_size
        self.retry_after = retry_after or (lambda waiting: 1)
        self._inbox: list = []
        self._pending_adds = 0
        self._cv = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._stop = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._stats = engine.stats()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        import torch

        # OpenMP thread counts are per thread: the engine thread uses what its creator set
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="ds-serve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        close = getattr(self.engine.executor, "close", None)
        if close is not None:
            close()

    def pause(self) -> None:
        """Stop running forwards after the current one; new requests and aborts are still taken in
        (queued requests count against ``max_queue_size``). For maintenance and deterministic tests."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stats(self) -> dict:
        """The engine's counters as of its last step (read without stopping it)."""
        stats = dict(self._stats)
        with self._cv:
            stats["waiting"] += self._pending_adds
        return stats

    # --- requests -------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, arrival: float) -> _Stream:
        """Queue a request (validated by the caller) or refuse it: QueueFullError, EngineDeadError."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error!r})")
        stream = _Stream(asyncio.get_running_loop(), params.n)
        with self._cv:
            waiting = self._pending_adds + len(self.engine.scheduler.waiting)
            if waiting >= self.max_queue_size:
                raise QueueFullError(waiting, self.retry_after(waiting))
            self._streams[request_id] = stream
            self._pending_adds += 1
            self._inbox.append(_Add(request_id, prompt, params, arrival, stream))
            self._cv.notify()
        return stream

    async def updates(self, request_id: str, stream: _Stream) -> AsyncIterator[SequenceUpdate]:
        """Updates of every choice of a submitted request until all are finished; leaving early (an
        exception, a cancelled task, a closed generator) aborts the request."""
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    stream.open_choices -= 1
                    if stream.open_choices == 0:
                        done = True
                        return
        finally:
            if not done:
                self.abort(request_id)

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       arrival: float) -> AsyncIterator[SequenceUpdate]:  # fmt: skip
        """``submit`` then ``updates``."""
        stream = self.submit(request_id, prompt, params, arrival)
        async for update in self.updates(request_id, stream):
            yield update

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._inbox.append(_Abort(request_id))
            self._cv.notify()

    # --- the engine thread ----------------------------------------------------------------------

    def _drain(self) -> None:
        with self._cv:
            ops, self._inbox = self._inbox, []
        engine = self.engine
        for op in ops:
            if isinstance(op, _Add):
                with self._cv:  # moved from the inbox count to the scheduler's queue in one go
                    self._pending_adds -= 1
                    if op.request_id not in self._streams:
                        continue  # aborted before it got here
                    try:
                        engine.add_request(op.request_id, op.prompt, op.params, arrival_time=op.arrival)
                    except Exception as exc:  # validated before queueing; anything left is reported, not fatal
                        self._streams.pop(op.request_id, None)
                        op.stream.put(exc)
            else:
                self._deliver(engine.abort(op.request_id))
                self._streams.pop(op.request_id, None)
                engine.release(op.request_id)

    def _deliver(self, updates: list[SequenceUpdate]) -> None:
        ended = []
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for update in updates:
            stream = self._streams.get(update.request_id)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, update))
            if update.finish_reason is not None:
                ended.append(update.request_id)
        for loop, items in batches.items():  # one wake-up of the event loop per step, not per token
            loop.call_soon_threadsafe(_put_all, items)
        for request_id in ended:  # after every update went out: choices may end in the same step
            req = self.engine.requests.get(request_id)
            if req is not None and all(s.is_finished for s in req.seqs):
                self._streams.pop(request_id, None)
                self.engine.release(request_id)

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self._threads)
        engine = self.engine
        while True:
            with self._cv:
                while not self._stop and not self._inbox and (self._paused or not engine.has_unfinished()):
                    self._cv.wait()
                if self._stop:
                    break
                paused = self._paused
            try:
                self._drain()
                if engine.has_unfinished() and not paused:
                    self._deliver(engine.step())
            except Exception as exc:  # a failed step: fail what is in flight, free it, keep serving
                log.exception("engine step failed; aborting %d requests", len(self._streams))
                self._fail_all(RequestFailedError(f"the engine step failed ({type(exc).__name__}: {exc}); "
                                                  "the request was aborted"))
            self._stats = engine.stats()
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(exc)
            try:
                self.engine.abort(request_id)
                self.engine.release(request_id)
            except Exception:  # the engine may be the broken part; the streams are released anyway
                log.exception("abort of %s failed", request_id)
        self._streams.clear()
