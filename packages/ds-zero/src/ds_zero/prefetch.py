"""Stage-3 prefetching: record the order in which parameters are needed, then gather ahead of it.

ZeRO-3 (Rajbhandari et al. 2020, section 5.3; DeepSpeed's ``PartitionedParameterCoordinator``)
overlaps the all-gathers with compute by gathering the next modules' parameters while the current
one runs. The order is not known before the model runs, so the first step of each mode (training,
evaluation: ``torch.is_grad_enabled()`` and ``module.training`` at the root's forward) records a
:class:`Trace`: one entry per *fetch point* — a module's forward, or the first use of a parameter in
backward. On later steps, at every fetch point that matches the trace:

- the parameters still missing are gathered (asynchronously: ``async_op=True``), then the next
  entries are gathered ahead, one all-gather per entry, until ``stage3_prefetch_bucket_size``
  elements of the trace ahead are covered (at least one entry when it is > 0; 0 disables prefetch);
- no gather is started while it would take the gathered-or-in-flight elements past
  ``stage3_max_live_parameters`` (it is retried at the next fetch point);
- a parameter whose module finished is kept gathered if the trace uses it again within
  ``stage3_max_reuse_distance`` elements (and the live total allows); else it is released, and the
  prefetcher will gather it again ahead of that use.

A step that leaves the trace (data-dependent control flow) gathers on demand from there on and its
order replaces the trace at the end of the step. All decisions depend only on the trace, the position
in it and the gathered state, so every rank issues the same collectives in the same order.

Hang safety (``fingerprint.py``): every gather carries a fingerprint of what it gathers for which
module. The step's collectives are logged; a step that replays a logged sequence checks each one
against the log before issuing it, and a rank about to issue something else first sends a *notice*
shaped like the gather its peers expect, so sizes always match and every rank learns where the paths
split. Steps without a log (the first two of each mode, or after a change of path) exchange a small
fixed-size header before each gather instead. Once per step (at the start of backward, or at the end
of a forward without backward) the ranks compare a digest of their module order, which catches a
rank that skipped or swapped modules without needing a different gather.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from typing import NamedTuple

import torch

from ds_core import comm

from .allgather import PendingGather, notice_round
from .fingerprint import (
    DATA,
    DIGEST,
    GUARD,
    NOTICE,
    Fingerprint,
    GatherTimeoutError,
    ModulePathMismatchError,
    check_rows,
    exchange,
    header_len,
)

__all__ = ["Stage3Settings", "Trace", "Prefetcher"]

_MASK = 2**62 - 1


class Stage3Settings(NamedTuple):
    """The stage-3 knobs of ``zero_optimization`` (element counts; DeepSpeed's defaults)."""

    prefetch_bucket: int = 50_000_000
    max_live: int = 1_000_000_000
    max_reuse: int = 1_000_000_000
    hang_timeout: float | None = None

    @classmethod
    def from_config(cls, cfg) -> Stage3Settings:
        return cls(int(cfg.stage3_prefetch_bucket_size), int(cfg.stage3_max_live_parameters),
                   int(cfg.stage3_max_reuse_distance), getattr(cfg, "stage3_hang_timeout", None))


class Trace:
    """One step's fetch points in order, each ``(key, shards)``, with element offsets and use positions."""

    def __init__(self, entries: list[tuple[int, tuple]]) -> None:
        self.entries = entries
        self.cum = [0]
        self.uses: dict[int, list[int]] = {}
        for i, (_, shards) in enumerate(entries):
            self.cum.append(self.cum[-1] + sum(s.numel for s in shards))
            for s in shards:
                self.uses.setdefault(id(s), []).append(i)

    def __len__(self) -> int:
        return len(self.entries)

    def elements(self, start: int, stop: int) -> int:
        """Elements gathered by entries ``start .. stop-1``."""
        return self.cum[stop] - self.cum[start]

    def next_use(self, s, after: int) -> int | None:
        uses = self.uses.get(id(s))
        if not uses:
            return None
        i = bisect_right(uses, after)
        return uses[i] if i < len(uses) else None


class _Step:
    """What one step (a root forward and its backward) has done so far."""

    def __init__(self, mode, trace: Trace | None, plan: list | None) -> None:
        self.mode, self.trace, self.plan = mode, trace, plan
        self.recorded: list[tuple[int, tuple]] = []
        self.log: list[tuple[int, int, int]] = []  # (key, target, length) of each gather issued
        self.forms: list[int] = []  # and its form: 0 exact, 1 qwZ-quantized, 2 hpZ secondary group
        self.plan_forms: list[int] = []
        self.pos = -1          # the last trace entry matched
        self.off = None        # (fetch index, key, recorded key) where the step left the trace
        self.frontier = 0      # the next trace entry the prefetcher has not gathered ahead
        self.swap_frontier = 0
        self.path = 0          # a hash of the keys so far
        self.checked = False   # digest exchanged


def _inflight(s) -> bool:
    return getattr(s, "inflight", None) is not None


class Prefetcher:
    """Gathers for a :class:`~ds_zero.gather.ParameterCoordinator`: see the module docstring.

    ``shards``: every :class:`~ds_zero.stage3.ShardedParameter` of the model; ``release(s)``: the
    coordinator's release (it keeps the saved-tensor bookkeeping).
    """

    def __init__(self, shards, group, release, settings: Stage3Settings | None = None) -> None:
        self.shards = [s for s in shards if not s.persistent]
        self.group = group
        self.world = comm.get_world_size(group)
        self.rank = comm.get_rank(group)
        self.release = release
        self.settings = settings or Stage3Settings()
        self.traces: dict = {}
        self.plans: dict = {}
        self.plan_forms: dict = {}
        self.step: _Step | None = None
        self.queue: deque = deque()  # gathers in flight, oldest first
        self.resident = 0            # elements gathered or in flight (not persistent)
        # counts since construction, for tests and tuning: gathers on demand / ahead, header exchanges
        # before a gather (steps without a logged order), notices, the most elements ever resident, and
        # parameters gathered because model code touched them outside their module (``gather.py``)
        self.stats = {"on_demand": 0, "prefetched": 0, "guarded": 0, "notices": 0, "peak_resident": 0,
                      "on_access": 0, "primary": 0, "secondary": 0}
        # ZeRO++ (``zeropp.py``): qwZ's block size (0: exact gathers) and hpZ's secondary partition
        self.quant = 0
        self.hpz = None
        if self.shards:
            s0 = self.shards[0]
            self.dtype, self.device = getattr(s0, "dtype", None) or s0.shard.dtype, s0.device

    # -- the step ---------------------------------------------------------------------------------------
    def begin(self, mode) -> None:
        """A root forward starts a step (ending the previous one if no backward ended it)."""
        self.end()
        self.step = _Step(mode, self.traces.get(mode), self.plans.get(mode))
        self.step.plan_forms = self.plan_forms.get(mode, [])
        self.resident = sum(s.numel for s in self.shards if s.gathered or _inflight(s))

    def check_path(self) -> None:
        """Compare this step's module order with every rank's (one small collective per step)."""
        st = self.step
        if st is None or st.checked or self.world == 1:
            return
        st.checked = True
        at, key, expected = st.off if st.off is not None else (-1, 0, 0)
        last = st.recorded[-1][0] if st.recorded else 0
        try:
            exchange(Fingerprint(DIGEST, len(st.recorded), st.path, last, at, key, expected), self.group,
                     self.settings.hang_timeout)
        except (ModulePathMismatchError, GatherTimeoutError):
            self.abandon()
            raise

    def end(self, check: bool = True) -> None:
        """End the step: check the path, finish gathers in flight, release what no module holds, and
        keep the order (and the collectives, once a step replayed it) for the next step of this mode.
        hpZ's secondary shards are dropped: the step's backward is over, the next step changes the weights."""
        st = self.step
        if st is None:
            return
        if check:
            self.check_path()
        self.step = None
        try:
            self.flush()
        except (ModulePathMismatchError, GatherTimeoutError):
            self.abandon()
            raise
        finally:
            self.drop_secondary()
        if st.trace is None or st.off is not None:
            self.traces[st.mode] = Trace(st.recorded)
            self.plans.pop(st.mode, None)
        elif st.pos + 1 == len(st.trace) and st.plan is None:
            self.plans[st.mode] = st.log
            self.plan_forms[st.mode] = st.forms
        # a step that followed the trace but stopped early (a forward without backward) keeps both

    def drop_secondary(self) -> None:
        if self.hpz is not None:
            for s in self.shards:
                s.secondary = None

    def abandon(self) -> None:
        """After an error: forget the step and the gathers in flight without waiting for them (a peer may
        never join them). Their parameters count as released; the next step gathers them again."""
        self.step = None
        self.drop_secondary()
        for pending in self.queue:
            for s in pending.items:
                if getattr(s, "inflight", None) is pending:
                    s.inflight = None
        self.queue.clear()

    def flush(self) -> None:
        while self.queue:
            self.queue[0].wait()
        for s in self.shards:
            if s.gathered and s.users == 0 and not s.held_for_backward:
                self.release(s)

    # -- fetch points -----------------------------------------------------------------------------------
    def fetch(self, key: int, shards: list) -> None:
        """``shards`` (not persistent) are needed now, at the fetch point ``key``: gather what is missing,
        gather ahead, and return once ``shards`` are whole."""
        try:
            self._fetch(key, shards)
        except (ModulePathMismatchError, GatherTimeoutError):
            self.abandon()
            raise

    def _fetch(self, key: int, shards: list) -> None:
        st = self.step
        on_trace = st is not None and self._advance(st, key, shards)
        wait = []
        missing = []
        for s in shards:
            pending = getattr(s, "inflight", None)
            if pending is not None:
                wait.append(pending)
            elif not s.gathered:
                missing.append(s)
        if missing:
            wait.append(self._launch(missing, key, key))
        if on_trace and self.settings.prefetch_bucket > 0:
            self._prefetch(st, key)
        for pending in wait:
            pending.wait()

    def _advance(self, st: _Step, key: int, shards: list) -> bool:
        """Record the fetch point; True when it is the trace's next entry."""
        entry = (key, tuple(shards))
        st.recorded.append(entry)
        st.path = (st.path * 1_000_003 + key) & _MASK
        tr = st.trace
        if tr is None or st.off is not None:
            return False
        nxt = st.pos + 1
        if nxt < len(tr) and tr.entries[nxt] == entry:
            st.pos = nxt
            return True
        st.off = (len(st.recorded) - 1, key, tr.entries[nxt][0] if nxt < len(tr) else 0)
        return False

    def _prefetch(self, st: _Step, key: int) -> None:
        tr, cfg = st.trace, self.settings
        start = st.pos + 1
        st.frontier = max(st.frontier, start)
        while st.frontier < len(tr) and tr.elements(start, st.frontier) < cfg.prefetch_bucket:
            target, shards = tr.entries[st.frontier]
            batch = [s for s in shards if not s.gathered and not _inflight(s)]
            if batch:
                if self.resident + sum(s.numel for s in batch) > cfg.max_live:
                    break  # over stage3_max_live_parameters: try again at a later fetch point
                self._launch(batch, key, target)
            st.frontier += 1
        # shards on NVMe: start reading the next bucket's worth beyond the gathers (no-op otherwise)
        st.swap_frontier = max(st.swap_frontier, st.frontier)
        while st.swap_frontier < len(tr) and tr.elements(st.frontier, st.swap_frontier) < cfg.prefetch_bucket:
            for s in tr.entries[st.swap_frontier][1]:
                hook = getattr(s, "prefetch", None)
                if hook is not None and not s.gathered and not _inflight(s):
                    hook()
            st.swap_frontier += 1

    def keep(self, s) -> bool:
        """Whether ``s``, just left by its last user, stays gathered for a use coming soon."""
        st = self.step
        if st is None or st.trace is None or st.off is not None:
            return False
        nxt = st.trace.next_use(s, st.pos)
        if nxt is None:
            return False
        cfg = self.settings
        if self.resident <= cfg.max_live and st.trace.elements(st.pos + 1, nxt) <= cfg.max_reuse:
            return True
        st.frontier = min(st.frontier, nxt)  # released: the prefetcher gathers it again before that use
        return False

    # -- collectives ------------------------------------------------------------------------------------
    def _launch(self, items: list, key: int, target: int) -> PendingGather:
        st = self.step
        # [Note: ZeRO++ gather form] hpZ's secondary gather when every item kept a secondary shard, else
        # the data-parallel gather (qwZ-quantized when on). The secondary shards exist on every rank alike
        # (made by the same gathers, dropped at the same step ends), so every rank picks the same form.
        hpz = self.hpz
        secondary = hpz is not None and all(getattr(s, "secondary", None) is not None for s in items)
        world = hpz.size if secondary else self.world
        length = header_len(self.dtype) + sum(s.padded // world for s in items)
        form = 2 if secondary else (1 if self.quant else 0)
        off_key, off_expected = (st.off[1], st.off[2]) if st is not None and st.off is not None else (0, 0)
        fp = Fingerprint(DATA, len(st.log) if st is not None else -1, key, target, length, off_key, off_expected)
        if self.world > 1:
            self._guard(st, fp, form)
        op = PendingGather(items, self.group, fp, self.queue, self.settings.hang_timeout, quant=self.quant,
                           hpz=hpz, keep=hpz is not None and not secondary and torch.is_grad_enabled())
        self.stats["secondary" if secondary else "primary"] += 1
        if st is not None:
            st.log.append((key, target, length))
            st.forms.append(form)
        self.resident += sum(s.numel for s in items)
        self.stats["on_demand" if key == target else "prefetched"] += 1
        self.stats["peak_resident"] = max(self.stats["peak_resident"], self.resident)
        return op

    def _guard(self, st: _Step | None, fp: Fingerprint, form: int = 0) -> None:
        """Make sure the other ranks issue a gather of the same size now (see the module docstring)."""
        plan = st.plan if st is not None else None
        if plan is not None and fp.seq < len(plan):
            expected = plan[fp.seq]
            expected_form = st.plan_forms[fp.seq] if fp.seq < len(st.plan_forms) else 0
            if expected == (fp.key, fp.target, fp.length) and expected_form == form:
                return  # as logged: the fingerprint travels with the data and is checked on arrival
            self.stats["notices"] += 1
            notice = fp._replace(kind=NOTICE)
            # shaped like the expected gather, on its group (hpZ: only that secondary group hears it)
            group = self.hpz.group if expected_form == 2 else self.group
            rows = notice_round(notice, expected[2], self.dtype, self.device, group,
                                self.settings.hang_timeout, self.queue, quant=self.quant if expected_form == 1 else 0)
            # equal everywhere: every rank left the log alike
            check_rows(rows, notice, self.hpz.rank if expected_form == 2 else self.rank)
            st.plan = None
            return
        self.stats["guarded"] += 1
        exchange(fp._replace(kind=GUARD), self.group, self.settings.hang_timeout)
