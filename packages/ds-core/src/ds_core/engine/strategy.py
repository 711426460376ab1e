"""The data-parallel strategy: one object per way of spreading training state over the data axis.

Stage 0 (every rank holds everything, ``replicated.py``) and ZeRO stages 1, 2 and 3 (ds-zero) are each
one object implementing :class:`DataParallelStrategy`; a feature contributes its own through the
``data_parallel_strategy`` component kind. The engine calls it and nothing else for gradients,
master weights, the optimizer and their checkpoint state:

    prepare(ctx)             once: take over the parameters (buffers, partitions, hooks), build the optimizer
    begin_backward(sync)     before each backward; ``sync``: this micro-step averages gradients
    end_backward()           after it: finish the averaging this backward started (or, right after
                             ``begin_backward(True)`` with no backward in between, average everything
                             accumulated so far — how the pipeline reduces once per batch)
    grad_norm_terms()        the local squared norms of the averaged gradients, and the groups to sum them over
    step(coef) -> bool       multiply gradients by ``coef`` (unscale × clip, decided by the engine's shared
                             step helper, ``step.py``), step the optimizer, refresh the model's weights
    zero_grad()              clear accumulated gradients
    sync_from_module()       the module's weights were changed from outside: make the masters follow
    save(writer) / load(reader, load_optimizer_states)
                             its part of a checkpoint (``checkpoint_layout.py``)
    module_keys() -> set     state-dict keys it saves and loads itself (stage 3: partitioned parameters)
    close()                  remove hooks and files

and reads ``optimizer`` (the torch optimizer whose ``param_groups`` the scheduler drives) and ``layout``
(the name of its checkpoint format, compared on load). Nothing calls back into the engine: what a
strategy needs is in its :class:`~ds_core.engine.context.TrainingContext`, and what it must do at other
points of the loop it subscribes to ``ctx.hooks``.

Schedules that need each parameter's full averaged gradient (the pipeline's tied weights) also ask for
:class:`FullGradients`, which stage 0 and ZeRO-1 implement and ZeRO-2/3 cannot.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import ConfigError
from ..protocol import require
from .step import NormTerm

__all__ = ["DataParallelStrategy", "FullGradients", "NormTerm", "check_strategy", "build_strategy"]


@runtime_checkable
class DataParallelStrategy(Protocol):
    """See the module docstring; ``layout`` names the checkpoint format (``"replicated"``, ``"zero"``...)."""

    layout: str
    optimizer: Any

    def prepare(self, ctx) -> None:
        """Take over ``ctx.module``'s parameters and build the optimizer (``ctx.make_optimizer``)."""

    def begin_backward(self, sync: bool) -> None:
        """A backward pass follows; ``sync``: average gradients during or after it."""

    def end_backward(self) -> None:
        """The backward pass ended: complete what it started (the averaged gradients are ready)."""

    def grad_norm_terms(self) -> list[NormTerm]:
        """This rank's contributions to the squared global gradient norm."""

    def step(self, coef: float) -> bool:
        """Apply the optimizer to gradients multiplied by ``coef``; False if nothing was applied."""

    def zero_grad(self) -> None:
        """Forget accumulated gradients."""

    def sync_from_module(self) -> None:
        """Take the module's current weights as the weights the optimizer steps (masters)."""

    def module_keys(self) -> set[str]:
        """Module state-dict keys this strategy saves and loads itself (not in the model files)."""

    def save(self, writer) -> None:
        """Add this rank's state to ``writer`` (a ``checkpoint_layout.StateWriter``); no collectives
        after the first file is written — the writer writes inside the atomic directory protocol."""

    def load(self, reader, load_optimizer_states: bool) -> None:
        """Restore from ``reader`` (a ``checkpoint_layout.StateReader``) after the module's weights were
        loaded; without optimizer states, or when ``reader.layout`` is not this strategy's, the masters
        follow the loaded weights (:meth:`sync_from_module`)."""

    def close(self) -> None:
        """Remove hooks and files; the strategy is not used afterwards."""


@runtime_checkable
class FullGradients(Protocol):
    """A strategy that keeps each parameter's full averaged gradient (stage 0, ZeRO-1)."""

    def gradient_of(self, param: torch.Tensor) -> torch.Tensor:
        """The accumulated (after ``end_backward(sync=True)``: averaged) fp32 gradient of ``param``, as a
        view that may be written."""


def check_strategy(strategy: Any, origin: str, prepared: bool = True) -> None:
    """Raise a :class:`ConfigError` naming every protocol member ``strategy`` lacks (before ``prepare``
    only its methods: attributes such as ``optimizer`` may be set there)."""
    require(strategy, DataParallelStrategy, f"the data-parallel strategy from {origin}", ConfigError,
            methods_only=not prepared)


def build_strategy(components: dict, config):
    """The strategy for this run, not yet prepared: the ``data_parallel_strategy`` component's when a
    feature provides one (called with its config section; ``None`` keeps the default), else the 1-bit
    strategy when ``optimizer.type`` is OneBitAdam / ZeroOneAdam / OneBitLamb (``ds_core.optim.onebit``;
    with a feature's strategy, e.g. a ZeRO stage, that is an error), else stage 0."""
    from ..optim.onebit.strategy import onebit_strategy

    strategy, origin = None, "ds-core (stage 0)"
    onebit = onebit_strategy(config)  # optimizer.type OneBitAdam / ZeroOneAdam / OneBitLamb
    if "data_parallel_strategy" in components:
        feature, factory, section = components["data_parallel_strategy"]
        strategy = factory(config.section(section) if section else None)
        origin = f"feature {feature!r}"
        if strategy is not None and onebit is not None:
            stage = getattr(config.section(section), "stage", None) if section else None
            what = f"ZeRO stage {stage}" if stage is not None else getattr(strategy, "name", origin)
            raise ConfigError(f"optimizer.type {onebit.optimizer_type!r} (1-bit compressed communication) runs on "
                              f"plain data parallelism, but the config asks for {what} ({origin}); set "
                              f"zero_optimization.stage to 0 (or remove the section), or use Adam/Lamb with ZeRO")
    if strategy is None and onebit is not None:
        strategy, origin = onebit, "ds-core (1-bit data parallel)"
    if strategy is None:
        from .replicated import ReplicatedStrategy

        strategy, origin = ReplicatedStrategy(), "ds-core (stage 0)"
    check_strategy(strategy, origin, prepared=False)
    return strategy, origin
