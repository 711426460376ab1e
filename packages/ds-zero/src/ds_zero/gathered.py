"""``GatheredParameters``: read (or, on one rank, modify) full stage-3 parameters outside their modules.

Under ZeRO stage 3 (Rajbhandari et al. 2020, section 5.3) a parameter is whole only while its module
runs. This context gathers the given parameters on entry and releases them on exit, as DeepSpeed's
``deepspeed.zero.GatheredParameters`` does. With ``modifier_rank=r`` the values rank r holds on exit
are broadcast and re-sharded (and the optimizer's fp32 masters refreshed), so an in-place change made
there — re-initialising a layer, loading weights — reaches every rank. A change on any other rank
would be lost silently, so it is an error instead (on every rank, so none waits in a collective).

Every rank must enter the context with the same parameters (the gather is a collective). Parameters
that are not partitioned (stage 0-2, or no ZeRO at all) pass through untouched.
"""

from __future__ import annotations

import torch

from ds_core import comm
from ds_core.errors import DSError

from .released import settle
from .stage3 import ShardedParameter, gather_shards

__all__ = ["GatheredParameters", "ModifiedOnNonModifierRankError"]


class ModifiedOnNonModifierRankError(DSError, RuntimeError):
    """A parameter gathered by :class:`GatheredParameters` was changed on a rank whose changes are discarded."""


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two float64 sums that change when any value changes (no copy of ``t``)."""
    return torch.stack([torch.sum(t, dtype=torch.float64),
                        torch.linalg.vector_norm(t, dtype=torch.float64)])


class GatheredParameters:
    """``with GatheredParameters(params, modifier_rank=None): ...`` — see the module docstring.

    ``params``: a parameter or an iterable of them. ``modifier_rank``: the rank (in the parameters'
    data-parallel group) whose in-place changes are kept; ``None`` means read-only. ``enabled=False``
    makes the context do nothing.
    """

    def __init__(self, params, modifier_rank: int | None = None, fwd_module=None, enabled: bool = True,
                 _any_rank_may_modify: bool = False) -> None:
        if isinstance(params, torch.Tensor):
            params = [params]
        self.shards: list[ShardedParameter] = []
        seen = set()
        for p in params or []:
            s = getattr(p, "ds_shard", None)
            if s is not None and id(s) not in seen:
                seen.add(id(s))
                self.shards.append(s)
        self.modifier_rank = modifier_rank
        self.any_rank_may_modify = _any_rank_may_modify  # Init's module.apply: rank modifier_rank's values win
        self.enabled = enabled and bool(self.shards)

    def __enter__(self):
        if not self.enabled:
            return self
        s0 = self.shards[0]
        self.group = s0.group
        self.rank = comm.get_rank(self.group)
        if self.modifier_rank is not None and not 0 <= self.modifier_rank < s0.world:
            raise DSError(f"GatheredParameters modifier_rank {self.modifier_rank} is not a rank of the "
                          f"parameters' group of {s0.world}; pass 0..{s0.world - 1} or None (read-only)")
        gather_shards([s for s in self.shards if not s.gathered], self.group)
        for s in self.shards:
            s.users += 1
        with torch.no_grad():
            self.before = [(s.param._version, _fingerprint(s.param.data)) for s in self.shards]
        return self

    def _changed(self) -> list[str]:
        out = []
        with torch.no_grad():
            for s, (version, fp) in zip(self.shards, self.before):
                if s.param._version != version or not torch.equal(_fingerprint(s.param.data), fp):
                    out.append(s.name)
        return out

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        try:
            if exc_type is None:
                self._publish()
        finally:
            for s in self.shards:
                s.users -= 1
                coordinator = getattr(s.owner, "coordinator", None)  # the engine's hooks, if any
                if coordinator is not None:
                    coordinator.release_if_unused(s)  # keeps a parameter its next module is about to use
                elif getattr(s, "borrow_base", None) is not None:
                    settle(s)  # borrowed before an engine adopted it: its shard takes the full value
                elif s.users == 0 and not s.held_for_backward:
                    s.release()

    def _publish(self) -> None:
        world = self.shards[0].world
        changed = self._changed() if self.rank != self.modifier_rank and not self.any_rank_may_modify else []
        flags = torch.zeros(world, dtype=torch.int32)
        if world > 1:
            comm.all_gather(flags, torch.tensor([1 if changed else 0], dtype=torch.int32), group=self.group)
        elif changed:
            flags[0] = 1
        bad = [r for r in range(world) if flags[r]]
        if bad:
            mine = f" (here: {', '.join(changed[:5])})" if changed else ""
            raise ModifiedOnNonModifierRankError(
                f"GatheredParameters: rank(s) {bad} modified gathered parameters{mine} but modifier_rank is "
                f"{self.modifier_rank}; those changes would be discarded. Modify them on one rank and pass "
                f"modifier_rank=<that rank> (its values are broadcast to all), or do not modify them")
        if self.modifier_rank is None:
            return
        src = self.modifier_rank if self.group is None else torch.distributed.get_global_rank(
            self.group, self.modifier_rank)
        owners = {}
        with torch.no_grad():
            for s in self.shards:
                full = s.param.data
                if not full.is_contiguous():
                    full = full.contiguous()
                if world > 1:
                    comm.broadcast(full, src=src, group=self.group)
                    if full is not s.param.data:
                        s.param.data.copy_(full)
                flat = full.reshape(-1)
                lo = min(s.numel, s.rank * s.part)
                hi = min(s.numel, lo + s.part)
                s.shard.zero_()
                s.shard[:hi - lo].copy_(flat[lo:hi])
                if s.owner is not None:
                    owners[id(s.owner)] = s.owner
            for owner in owners.values():
                if owner.optimizer is not None:
                    owner.optimizer.reload_masters_from_model()
