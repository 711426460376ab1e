"""Continuous batching with a token budget per forward (SplitFuse), preemption and FCFS admission.

Every step the scheduler builds one ragged batch of at most ``max_num_tokens`` tokens:

1. running requests that are decoding, one token each, oldest first;
2. running requests still prefilling, a chunk each from what is left of the budget;
3. swapped-out requests coming back, oldest first;
4. waiting requests, strictly first come first served: the head of the queue is admitted with a
   chunk of its prompt (past any cached prefix) or nobody behind it is.

Long prompts are thus split into chunks that share forwards with other requests' decode tokens,
so decoding never stalls behind a long prefill (DeepSpeed-FastGen's Dynamic SplitFuse; Agrawal et
al., "Sarathi-Serve", 2024).

[Note: no deadlock] Priority is arrival order. When a running request needs a block and none is
free, the newest running request is preempted (its blocks freed for recompute, or copied to host
memory for swap), possibly the requester itself. The oldest request therefore never loses its
blocks to a newer one, and it can always finish because the engine refuses a ``max_model_len``
larger than the whole cache; then the next oldest, and so on. Admission keeps a watermark of free
blocks except when nothing runs, so an empty engine always admits its head request. Preempted
requests rejoin the queue in arrival order, ahead of everything that arrived after them.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

__all__ = ["Scheduler", "SchedulerOutput"]


@dataclass
class SchedulerOutput:
    """One step's plan: which tokens of which sequences to run, and the block copies to do first."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)  # freed for recompute
    swap_out: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # copy to host, then free
    swap_in: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # copy from host into these

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _priority(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


class Scheduler:
    """Decides each step's batch; owns the waiting, running and swapped queues."""

    def __init__(self, block_manager: BlockManager, *, max_num_tokens: int, max_num_seqs: int,
                 preemption_mode: str = "recompute", swap_capacity_blocks: int = 0) -> None:  # fmt: skip
        self.bm = block_manager
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.preemption_mode = preemption_mode
        self.swap_capacity_blocks = swap_capacity_blocks if preemption_mode == "swap" else 0
        self.swapped_blocks = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0

    # --- queues ---------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        if not self.waiting or _priority(self.waiting[-1]) <= _priority(seq):
            self.waiting.append(seq)
        else:  # a preempted request goes back in arrival order
            keys = [_priority(s) for s in self.waiting]
            self.waiting.insert(bisect.bisect(keys, _priority(seq)), seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of every queue, free its blocks and host copy, mark it finished."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
            self.swapped_blocks -= seq.swapped_kv_blocks
            seq.swapped_kv = None
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # --- the step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_tokens
        planned: dict[Sequence, int] = {}
        preempted = False

        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.allocate(seq, n):
                victim = self.running[-1]
                budget += planned.pop(victim, 0)
                self._preempt(victim, out)
                preempted = True
                if victim is seq:
                    break
            else:
                planned[seq] = n
                budget -= n

        if not preempted:
            budget = self._swap_in(out, planned, budget)
        if not preempted and not self.swapped:
            self._admit(planned, budget)

        out.scheduled = list(planned.items())
        return out

    def _swap_in(self, out: SchedulerOutput, planned: dict[Sequence, int], budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            n = min(seq.num_uncomputed_tokens, budget)
            grown = self.bm.blocks_for(seq.num_computed_tokens + n)
            if grown + self.bm.watermark_blocks > self.bm.num_free_blocks:
                break
            blocks = self.bm.swap_in(seq, seq.swapped_kv_blocks)
            if blocks is None or not self.bm.allocate(seq, n):  # both were checked just above
                raise RuntimeError(f"swap-in of {seq} failed with {self.bm.num_free_blocks} free blocks")
            self.swapped.popleft()
            self.swapped_blocks -= seq.swapped_kv_blocks
            out.swap_in.append((seq, blocks))
            self._run(seq)
            planned[seq] = n
            budget -= n
        return budget

    def _admit(self, planned: dict[Sequence, int], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.bm.lookup_prefix(seq)
            n = min(seq.num_tokens - len(prefix) * self.bm.block_size, budget)
            # an idle engine admits its head even into the watermark, or it could wait forever
            if not self.bm.allocate(seq, n, prefix, admit=bool(self.running)):
                break  # first come first served: nobody overtakes the head of the queue
            if not seq.admitted:
                seq.admitted = True
                seq.num_prefix_hit_tokens = seq.num_computed_tokens
                self.bm.record_prefix_lookup(seq.num_prompt_tokens, seq.num_computed_tokens)
            self.waiting.popleft()
            self._run(seq)
            planned[seq] = n
            budget -= n

    def _run(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_priority)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1
        num_blocks = len(seq.block_ids)
        if self.swapped_blocks + num_blocks <= self.swap_capacity_blocks:
            blocks = self.bm.swap_out(seq)
            seq.swapped_kv_blocks = num_blocks
            self.swapped_blocks += num_blocks
            seq.status = SequenceStatus.SWAPPED
            # swapped requests are older than any waiting one; keep them in arrival order
            keys = [_priority(s) for s in self.swapped]
            self.swapped.insert(bisect.bisect(keys, _priority(seq)), seq)
            out.swap_out.append((seq, blocks))
        else:
            self.bm.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self._enqueue(seq)
            out.preempted.append(seq)
