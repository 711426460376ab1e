"""Engine hooks: points in the training loop that features subscribe to instead of reaching into the engine.

The engine fires, in this order per micro-step and optimizer step:

==================  =================================  ==============================================
event               called with                        subscribers today
==================  =================================  ==============================================
``forward_start``   nothing                            -
``backward_start``  ``sync`` (this micro-step reduces)  ZeRO-3: ranks compare their forward's module order
``backward_end``    ``sync``                           ZeRO-3: the gather/release step ends
``before_step``     nothing                            ZeRO-3: no gather may still be in flight
``after_step``      :class:`StepInfo`                  compression schedules (``global_steps``)
==================  =================================  ==============================================

plus one *reducing* hook, ``grad_norm``: functions ``f(sq) -> sq`` that turn the squared gradient norm
the data-parallel strategy measured into the global one. The pipeline subscribes to sum it over its
stages (tied copies counted once); the result decides overflow and clipping on every rank.

Subscribers run in subscription order; :meth:`EngineHooks.subscribe` returns a handle whose
``remove()`` unsubscribes. Hooks must be the same on every rank when they run collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import DSError

__all__ = ["EngineHooks", "StepInfo", "EVENTS", "HookHandle"]

EVENTS = ("forward_start", "backward_start", "backward_end", "before_step", "after_step")


class StepInfo(NamedTuple):
    """What ``after_step`` subscribers learn about the optimizer step that just ended."""

    global_steps: int  #: optimizer steps taken so far (skipped fp16 steps included, as in DeepSpeed)
    applied: bool  #: False when the step was skipped (fp16 overflow)
    grad_norm: float | None  #: the global gradient norm (inf when skipped)
    lr: float  #: the learning rate of the first parameter group after the scheduler stepped


class HookHandle:
    """Returned by :meth:`EngineHooks.subscribe`; ``remove()`` unsubscribes (idempotent)."""

    def __init__(self, subscribers: list, fn: Callable) -> None:
        self._subscribers, self._fn = subscribers, fn

    def remove(self) -> None:
        if self._fn in self._subscribers:
            self._subscribers.remove(self._fn)


class EngineHooks:
    """Subscriber lists per event (see the module docstring)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Callable]] = {e: [] for e in (*EVENTS, "grad_norm")}

    def subscribe(self, event: str, fn: Callable) -> HookHandle:
        """Call ``fn`` at ``event`` (one of :data:`EVENTS`, or ``"grad_norm"`` for a norm reducer)."""
        if event not in self._subscribers:
            raise DSError(f"unknown engine hook {event!r}; the events are {', '.join(self._subscribers)}")
        self._subscribers[event].append(fn)
        return HookHandle(self._subscribers[event], fn)

    def fire(self, event: str, *args: Any) -> None:
        for fn in self._subscribers[event]:
            fn(*args)

    def reduce_grad_norm(self, sq: float) -> float:
        """Pass the strategy's squared gradient norm through every ``grad_norm`` subscriber."""
        for fn in self._subscribers["grad_norm"]:
            sq = fn(sq)
        return sq

    def __bool__(self) -> bool:
        return any(self._subscribers.values())
