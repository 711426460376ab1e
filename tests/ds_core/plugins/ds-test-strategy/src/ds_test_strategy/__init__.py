"""A third-party data-parallel strategy, written against ds-core's protocol only (no ds-zero).

Parameters, gradients and optimizer state are all sharded over the data axis, as at ZeRO stage 3, in
the simplest way that is still real: each parameter is flattened, padded and split in equal shards;
between steps a rank holds only its fp32 shard (the parameter's ``data`` is empty); the whole model is
all-gathered when a forward starts (an ``forward_start`` engine hook) and released after backward, once
every gradient has been reduce-scattered into the shards. Its checkpoint state is each rank's shards
and their optimizer state. It exists to show that the engine's seam is one thing: this object replaces
the data-parallel strategy and nothing else (precision, the step decision, checkpoints' directory
protocol, hooks and counters stay the engine's).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ds_core import comm
from ds_core.config import Section
from ds_core.engine.checkpoint import CheckpointError, join_optimizer_state, split_optimizer_state
from ds_core.engine.step import NormTerm

__all__ = ["ShardedConfig", "ShardedStrategy", "build"]


class ShardedConfig(Section):
    """``test_sharded_strategy``: no options beyond switching it on."""

    enabled: bool = Field(True, description="Use the sharded strategy.")


def build(section):
    return ShardedStrategy() if section is not None and section.enabled else None


class ShardedStrategy:
    layout = "test-sharded"
    name = "test sharded strategy"

    def __init__(self) -> None:
        self.optimizer = None
        self.gathered = True

    def prepare(self, ctx) -> None:
        self.ctx = ctx
        self.group = ctx.groups.data
        self.world, self.rank = comm.get_world_size(self.group), comm.get_rank(self.group)
        self.dtype = ctx.precision.dtype
        self.names = {}
        for name, p in ctx.module.named_parameters():
            self.names.setdefault(id(p), name)
        self.params = [p for p in ctx.params]
        self.shapes = [p.shape for p in self.params]
        self.part = [-(-p.numel() // self.world) for p in self.params]
        self.shards = []
        for p, part in zip(self.params, self.part):
            flat = torch.zeros(part * self.world, dtype=torch.float32)
            flat[:p.numel()] = p.detach().reshape(-1).float()
            shard = torch.nn.Parameter(flat[self.rank * part:(self.rank + 1) * part].clone())
            shard.grad = torch.zeros_like(shard)
            self.shards.append(shard)
        index = {id(p): i for i, p in enumerate(self.params)}
        groups = [{**g, "params": [self.shards[index[id(p)]] for p in g["params"]]} for g in ctx.param_groups]
        self.optimizer = ctx.make_optimizer(groups, "cpu")
        self._release()
        self._hooks = [ctx.hooks.subscribe("forward_start", self._gather)]

    # -- gather / release -------------------------------------------------------------------------
    def _gather(self) -> None:
        if self.gathered:
            return
        with torch.no_grad():
            for p, shard, part, shape in zip(self.params, self.shards, self.part, self.shapes):
                full = torch.empty(part * self.world, dtype=self.dtype)
                comm.all_gather(full, shard.detach().to(self.dtype), group=self.group)
                p.data = full[:shape.numel()].view(shape)
        self.gathered = True

    def _release(self) -> None:
        for p in self.params:
            p.data = torch.empty(0, dtype=self.dtype)
        self.gathered = False

    # -- the protocol -----------------------------------------------------------------------------
    def begin_backward(self, sync: bool) -> None:
        pass

    def end_backward(self) -> None:
        """Reduce-scatter every gradient into this rank's shard gradient (every micro-step), then release."""
        for p, shard, part in zip(self.params, self.shards, self.part):
            full = torch.zeros(part * self.world, dtype=torch.float32)
            if p.grad is not None:
                full[:p.numel()] = p.grad.reshape(-1).float()
            out = torch.empty(part, dtype=torch.float32)
            comm.reduce_scatter(out, full, group=self.group)
            shard.grad.add_(out, alpha=1.0 / self.world)
            p.grad = None
        self._release()

    def grad_norm_terms(self) -> list[NormTerm]:
        sq = sum(torch.linalg.vector_norm(s.grad).double() ** 2 for s in self.shards)
        return [NormTerm(sq, (self.group,))]

    def step(self, coef: float) -> bool:
        for s in self.shards:
            s.grad.mul_(coef)
        self.optimizer.step()
        return True

    def zero_grad(self) -> None:
        for s in self.shards:
            s.grad.zero_()

    def sync_from_module(self) -> None:
        if self.gathered:
            with torch.no_grad():
                for p, shard, part in zip(self.params, self.shards, self.part):
                    flat = p.detach().reshape(-1).float()
                    lo = min(p.numel(), self.rank * part)
                    hi = min(p.numel(), lo + part)
                    shard.zero_()
                    shard[:hi - lo].copy_(flat[lo:hi])

    def module_keys(self) -> set[str]:
        return {name for name, p in self.ctx.module.named_parameters(remove_duplicate=False)
                if id(p) in {id(q) for q in self.params}}

    def save(self, writer) -> None:
        tensors, meta = split_optimizer_state(self.optimizer.state_dict())
        writer.per_rank("shards", {self.names[id(p)]: s.detach() for p, s in zip(self.params, self.shards)})
        writer.per_rank("optimizer", tensors)
        writer.rank_meta["optimizer"] = meta
        writer.meta["test_sharded"] = {"world": self.world}

    def load(self, reader, load_optimizer_states: bool) -> None:
        mine = reader.layout == self.layout and reader.meta["test_sharded"]["world"] == self.world
        if load_optimizer_states and not mine:
            raise CheckpointError(f"{reader.path}: saved by another strategy or world size; pass "
                                  f"load_optimizer_states=False")
        full = None if mine else reader.module_state()
        reader.load_module()  # buffers and anything not sharded
        with torch.no_grad():
            if mine:
                saved = reader.per_rank("shards")
                for p, s in zip(self.params, self.shards):
                    s.copy_(saved[self.names[id(p)]])
            else:
                for p, s, part in zip(self.params, self.shards, self.part):
                    flat = full[self.names[id(p)]].reshape(-1).float()
                    lo = min(flat.numel(), self.rank * part)
                    hi = min(flat.numel(), lo + part)
                    s.zero_()
                    s[:hi - lo].copy_(flat[lo:hi])
        if load_optimizer_states:
            state = join_optimizer_state(reader.per_rank("optimizer") or {}, reader.rank_meta["optimizer"])
            self.optimizer.load_state_dict(state)
        self._release()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
