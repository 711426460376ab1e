"""Pipeline schedules as data: for one stage, the instructions of each step, in order.

A schedule knows nothing about tensors or processes; the engine executes its instructions
(``executor.py``) and tests compare the streams with the papers without starting a process.

- :class:`TrainSchedule`: synchronous 1F1B (PipeDream-Flush, Narayanan et al. 2021, "Memory-Efficient
  Pipeline-Parallel DNN Training", figure 3): stage ``s`` of ``p`` runs ``min(p - s - 1, m)`` warm-up
  forwards, then alternates one forward and one backward, then drains the remaining backwards; at most
  ``p - s`` micro-batches are in flight, and the batch ends with one optimizer step (a flush), so the
  weights are those of plain gradient accumulation.
- :class:`GPipeSchedule`: all forwards then all backwards (Huang et al. 2019, GPipe); same bubble,
  ``m`` activations in flight.
- :class:`InferenceSchedule`: forwards only.

With forward time ``f`` and backward time ``b`` per stage, both training schedules take
``(m + p - 1)(f + b)``, so the idle fraction (the bubble) is ``(p - 1) / (m + p - 1)``;
:func:`simulate` replays a schedule with those unit costs and reports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "Instruction", "LoadMicroBatch", "ForwardPass", "BackwardPass", "SendActivation", "RecvActivation",
    "SendGrad", "RecvGrad", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep",
    "PipeSchedule", "TrainSchedule", "GPipeSchedule", "InferenceSchedule", "simulate", "theoretical_bubble",
]


@dataclass(frozen=True)
class Instruction:
    """One thing a stage does; ``micro_batch`` is -1 for per-batch instructions."""

    micro_batch: int = -1

    def __repr__(self) -> str:
        return type(self).__name__ + (f"({self.micro_batch})" if self.micro_batch >= 0 else "()")


class LoadMicroBatch(Instruction):
    """First stage: take the inputs of the next item of the data iterator; last stage: its labels."""


class ForwardPass(Instruction):
    pass


class BackwardPass(Instruction):
    pass


class SendActivation(Instruction):
    pass


class RecvActivation(Instruction):
    pass


class SendGrad(Instruction):
    pass


class RecvGrad(Instruction):
    pass


class ReduceTiedGrads(Instruction):
    """Sum the gradients of tied weights over the stages that hold them."""


class ReduceGrads(Instruction):
    """Average gradients over the data-parallel replicas of this stage."""


class OptimizerStep(Instruction):
    pass


class PipeSchedule:
    """The instruction stream of ``stage_id`` for one batch of ``micro_batches``."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        if micro_batches < 1 or stages < 1 or not 0 <= stage_id < stages:
            raise ValueError(f"schedule needs micro_batches >= 1 and 0 <= stage_id < stages, got "
                             f"micro_batches={micro_batches}, stages={stages}, stage_id={stage_id}")
        self.micro_batches, self.stages, self.stage_id = micro_batches, stages, stage_id
        self.is_first, self.is_last = stage_id == 0, stage_id == stages - 1

    def order(self) -> list[tuple[str, int]]:
        """The compute order: ``("F", i)`` and ``("B", i)``."""
        raise NotImplementedError

    def _forward(self, i: int) -> list[Instruction]:
        head = [LoadMicroBatch(i)] if self.is_first else [RecvActivation(i)]
        if self.is_last and not self.is_first:
            head.append(LoadMicroBatch(i))
        return head + [ForwardPass(i)] + ([] if self.is_last else [SendActivation(i)])

    def _backward(self, i: int) -> list[Instruction]:
        return (([] if self.is_last else [RecvGrad(i)]) + [BackwardPass(i)] +
                ([] if self.is_first else [SendGrad(i)]))

    def steps(self) -> Iterator[list[Instruction]]:
        for kind, i in self.order():
            yield self._forward(i) if kind == "F" else self._backward(i)
        yield [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]

    def instructions(self) -> list[Instruction]:
        return [cmd for step in self.steps() for cmd in step]


class TrainSchedule(PipeSchedule):
    """Synchronous 1F1B (PipeDream-Flush); see the module docstring."""

    def order(self) -> list[tuple[str, int]]:
        m = self.micro_batches
        warmup = min(self.stages - self.stage_id - 1, m)
        out = [("F", i) for i in range(warmup)]
        for j in range(m - warmup):
            out += [("F", warmup + j), ("B", j)]
        out += [("B", j) for j in range(m - warmup, m)]
        return out


class GPipeSchedule(PipeSchedule):
    """All forwards, then all backwards (GPipe)."""

    def order(self) -> list[tuple[str, int]]:
        m = self.micro_batches
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


class InferenceSchedule(PipeSchedule):
    """Forwards only; no reduction or step."""

    def order(self) -> list[tuple[str, int]]:
        return [("F", i) for i in range(self.micro_batches)]

    def steps(self) -> Iterator[list[Instruction]]:
        for _, i in self.order():
            yield self._forward(i)


def theoretical_bubble(stages: int, micro_batches: int) -> float:
    """(p - 1) / (m + p - 1): the idle fraction of GPipe and 1F1B (Narayanan et al. 2021, section 2.2)."""
    return (stages - 1) / (micro_batches + stages - 1)


def simulate(schedule_cls: type[PipeSchedule], stages: int, micro_batches: int, forward: float = 1.0,
             backward: float = 2.0) -> tuple[float, float]:
    """Replay the schedule with fixed compute costs and free communication.

    Returns ``(makespan, bubble)`` where the bubble is the idle fraction of the stages' time.
    """
    orders = [schedule_cls(micro_batches, stages, s).order() for s in range(stages)]
    done: dict[tuple[str, int, int], float] = {}
    pos, clock = [0] * stages, [0.0] * stages
    while any(pos[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            if kind == "F":
                deps = [("F", s - 1, i)] if s > 0 else []
            else:
                deps = [("B", s + 1, i)] if s < stages - 1 else [("F", s, i)]
            if any(d not in done for d in deps):
                continue
            start = max([clock[s]] + [done[d] for d in deps])
            clock[s] = start + (forward if kind == "F" else backward)
            done[(kind, s, i)] = clock[s]
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule_cls.__name__} deadlocks for stages={stages}, m={micro_batches}")
    makespan = max(clock)
    per_stage = sum(forward if k == "F" else backward for k, _ in orders[0])
    return makespan, 1.0 - per_stage / makespan
