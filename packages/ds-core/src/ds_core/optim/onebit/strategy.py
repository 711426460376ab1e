"""The 1-bit data-parallel strategy: stage 0 whose gradient all-reduce the optimizer turns off.

:class:`OneBitStrategy` is stage 0 (:class:`~ds_core.engine.replicated.ReplicatedStrategy`: the flat
gradient buffer, the bucketed all-reduce overlapped with backward, fp32 masters for 16-bit models)
with a 1-bit optimizer (``optimizers.py``) as its optimizer. Before every backward it asks the optimizer
whether the coming step wants averaged gradients: during warm-up the usual all-reduce runs; after it the
reducer does not synchronise at all — gradients stay local, accumulate across micro-steps as usual, and
the optimizer's compressed all-reduce of its momentum is the only gradient traffic of the step.

After warm-up the gradient norm the engine clips by is ``sqrt(mean over ranks of ||local gradient||^2)``
(a scalar all-reduce; no gradient is averaged in full precision to compute it).

Its checkpoint state is per rank (``onebit_rank{r}.safetensors`` + the rank's JSON): the moments, the
worker and server error buffers (which differ between ranks), the rank's fp32 weights (0/1 Adam's local
steps let them differ between syncs) and the optimizer's counters. A load restores all of it, so a resumed
run continues as the uninterrupted one would.
"""

from __future__ import annotations

import torch

from ...engine.checkpoint import CheckpointError
from ...engine.replicated import ReplicatedStrategy
from ...engine.step import NormTerm
from ...errors import ConfigError

__all__ = ["OneBitStrategy", "ONEBIT_TYPES"]

#: optimizer.type (lower case) -> class name in ``optimizers.py``
ONEBIT_TYPES = {"onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb"}


class OneBitStrategy(ReplicatedStrategy):
    """Stage 0 with a 1-bit optimizer (module docstring)."""

    layout = "onebit"

    def __init__(self, optimizer_type: str) -> None:
        super().__init__()
        self.optimizer_type = ONEBIT_TYPES[optimizer_type.lower()]
        self.name = f"{self.optimizer_type} (1-bit compressed data parallel)"

    def prepare(self, ctx) -> None:
        if ctx.make_optimizer.client is not None:
            raise ConfigError(f"optimizer.type {self.optimizer_type!r} in the config and optimizer= passed to "
                              f"initialize(): the 1-bit strategy builds its own optimizer; remove one of them")
        if ctx.groups.axes:
            raise ConfigError(f"{self.optimizer_type} averages over the data axis only, but parameters are tagged "
                              f"with axes {sorted(ctx.groups.axes)} (experts, tensor parallelism); use Adam/Lamb "
                              f"for such models")
        super().prepare(ctx)
        from .optimizers import OneBitOptimizer

        if not isinstance(self.optimizer, OneBitOptimizer):
            raise ConfigError(f"the optimizer built for {self.optimizer_type} is {type(self.optimizer).__name__}")
        self.optimizer.set_group(ctx.groups.data)
        self.dp_group = ctx.groups.data

    # -- backward: the plain all-reduce only while the optimizer wants averaged gradients -------------
    def begin_backward(self, sync: bool) -> None:
        self.reducer.begin(sync and self.optimizer.needs_averaged_gradients())

    def grad_norm_terms(self) -> list[NormTerm]:
        if self.optimizer.needs_averaged_gradients():
            return super().grad_norm_terms()
        world = max(1, self.ctx.world_size if self.dp_group is None else _size(self.dp_group))
        sq = torch.linalg.vector_norm(self.grads.buffer).double() ** 2 / world
        return [NormTerm(sq, (self.dp_group,) if self.dp_group is not None else ())]

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, writer) -> None:
        tensors, meta = self.optimizer.flat_state()
        tensors = dict(tensors)
        tensors["params"] = self.optimizer._flat_params().clone()
        writer.per_rank("onebit", tensors)
        writer.rank_meta["onebit"] = meta
        writer.meta["onebit"] = {"type": self.optimizer_type, "world": self.ctx.world_size}

    def load(self, reader, load_optimizer_states: bool) -> None:
        tensors = reader.per_rank("onebit") if load_optimizer_states else None
        if load_optimizer_states:
            saved = reader.meta.get("onebit", {})
            if tensors is None or saved.get("type") != self.optimizer_type:
                raise CheckpointError(
                    f"{reader.path}: no {self.optimizer_type} state for data rank {reader.data_rank} (found "
                    f"{saved.get('type') or reader.layout_name} saved by {saved.get('world', '?')} ranks); pass "
                    f"load_optimizer_states=False to load the model only")
        reader.load_module()
        if tensors is None:
            self.sync_from_module()
            return
        try:
            self.optimizer.load_flat_state(tensors, reader.rank_meta["onebit"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{reader.path}: {exc}; pass load_optimizer_states=False to load the model "
                                  f"only") from exc
        with torch.no_grad():
            self.optimizer._write_params(tensors["params"])  # this rank's own weights (local steps)
            if self.precision.has_masters:
                for p in self.grads.params:
                    p.copy_(self.masters[id(p)])


def _size(group) -> int:
    from ... import comm

    return comm.get_world_size(group)


def onebit_strategy(config):
    """The strategy for a config whose optimizer is a 1-bit one, else None."""
    opt = getattr(config, "optimizer", None)
    if opt is None or str(opt.type).strip().lower() not in ONEBIT_TYPES:
        return None
    return OneBitStrategy(str(opt.type).strip())

