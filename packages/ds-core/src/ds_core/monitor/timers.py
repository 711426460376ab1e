"""Named wall-clock timers for ``wall_clock_breakdown``.

The engine times forward, backward, gradient reduction and the optimizer step under fixed names and
prints one line every ``steps_per_print`` steps (DeepSpeed's format)::

    time (ms) | forward: 12.34 | backward: 25.10 | step: 3.02

Kernels on a device run asynchronously, so a timer on a non-CPU accelerator synchronizes the device
at ``start`` and ``stop``; otherwise it would time the kernel launches, not the work. That costs
throughput, which is why the breakdown is opt-in: when it is off the engine gets
:class:`NoOpTimers`, with the same interface and nothing behind it, and calls it unconditionally.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

__all__ = ["Timer", "Timers", "NoOpTimers", "make_timers"]


class Timer:
    """One named timer. Elapsed time accumulates over start/stop pairs until :meth:`reset`."""

    def __init__(self, name: str, sync: Callable[[], None] | None = None) -> None:
        self.name = name
        self._sync = sync
        self._elapsed_s = 0.0
        self._started_at: float | None = None
        self.count = 0  # completed start/stop pairs since the last reset

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def start(self) -> Timer:
        if self._started_at is not None:
            raise RuntimeError(f"timer {self.name!r} is already running; call stop() before start()")
        if self._sync is not None:
            self._sync()
        self._started_at = time.perf_counter()
        return self

    def stop(self) -> float:
        """Stop and return the milliseconds of this start/stop pair."""
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} is not running; call start() before stop()")
        if self._sync is not None:
            self._sync()
        interval = time.perf_counter() - self._started_at
        self._started_at = None
        self._elapsed_s += interval
        self.count += 1
        return interval * 1000.0

    def reset(self) -> None:
        self._elapsed_s = 0.0
        self._started_at = None
        self.count = 0

    def elapsed(self, reset: bool = True) -> float:
        """Accumulated milliseconds. A running timer is measured up to now and keeps running."""
        running = self._started_at is not None
        if running:
            self.stop()
        value = self._elapsed_s * 1000.0
        if reset:
            self.reset()
        if running:
            self.start()
        return value

    def __enter__(self) -> Timer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Timer({self.name!r}, elapsed_ms={self._elapsed_s * 1000.0:.3f}, running={self.running})"


class Timers:
    """A registry of :class:`Timer` by name: ``timers("forward").start()``.

    ``synchronize=None`` synchronizes when the accelerator's device type is not ``cpu``. Pass
    ``accelerator`` to avoid asking :func:`ds_core.accelerator.get_accelerator`.
    """

    enabled = True

    def __init__(self, synchronize: bool | None = None, accelerator=None) -> None:
        if synchronize is None or synchronize:
            if accelerator is None:
                from ..accelerator import get_accelerator

                accelerator = get_accelerator()
            if synchronize is None:
                synchronize = accelerator.device_type != "cpu"
        self._sync = accelerator.synchronize if synchronize else None
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = Timer(name, self._sync)
        return timer

    def __contains__(self, name: str) -> bool:
        return name in self._timers

    @property
    def names(self) -> list[str]:
        return list(self._timers)

    def elapsed(self, names: Iterable[str], reset: bool = True) -> dict[str, float]:
        """Milliseconds per name (timers never started are skipped)."""
        return {n: self._timers[n].elapsed(reset=reset) for n in names if n in self._timers}

    def reset(self) -> None:
        for timer in self._timers.values():
            timer.reset()

    def log(self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True) -> str:
        """``"time (ms) | forward: 12.34 | backward: 25.10"``; each value divided by ``normalizer``.

        Use ``normalizer=steps`` when the timers accumulated over several steps to print the mean.
        Names never started are left out; an empty string means there was nothing to report.
        """
        if normalizer <= 0:
            raise ValueError(f"normalizer {normalizer!r} must be > 0 (it divides the elapsed times)")
        parts = [f"{name}: {ms / normalizer:.2f}" for name, ms in self.elapsed(names, reset).items()]
        return "time (ms) | " + " | ".join(parts) if parts else ""

    def __repr__(self) -> str:
        return f"Timers({', '.join(self._timers)}; synchronize={self._sync is not None})"


class _NoOpTimer:
    name = ""
    running = False
    count = 0

    def start(self) -> _NoOpTimer:
        return self

    def stop(self) -> float:
        return 0.0

    def reset(self) -> None:
        pass

    def elapsed(self, reset: bool = True) -> float:
        return 0.0

    def __enter__(self) -> _NoOpTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NOOP_TIMER = _NoOpTimer()


class NoOpTimers:
    """The :class:`Timers` interface doing nothing: one shared timer object, no clock, no sync."""

    enabled = False

    @property
    def names(self) -> list[str]:
        return []

    def __call__(self, name: str) -> _NoOpTimer:
        return _NOOP_TIMER

    def __contains__(self, name: str) -> bool:
        return False

    def elapsed(self, names: Iterable[str], reset: bool = True) -> dict[str, float]:
        return {}

    def reset(self) -> None:
        pass

    def log(self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True) -> str:
        return ""

    def __repr__(self) -> str:
        return "NoOpTimers()"


def make_timers(enabled: bool, synchronize: bool | None = None, accelerator=None) -> Timers | NoOpTimers:
    """:class:`Timers` when ``enabled`` (the config's ``wall_clock_breakdown``), else :class:`NoOpTimers`."""
    return Timers(synchronize, accelerator) if enabled else NoOpTimers()
