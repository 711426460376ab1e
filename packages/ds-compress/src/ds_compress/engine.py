"""The engine seam: the ``compression_training`` section's ``model_wrapper`` component.

The only engine-facing code of ds-compress. When a config has ``compression_training``, the engine
calls :func:`build` with a ``ModelContext`` and the module; we prepare the module (unless the user
already called ``init_compression``, e.g. with a teacher for layer reduction) and hang the schedule on
the module's forward: before each forward the layers are put in the state of the engine's
``global_steps`` (the number of optimizer steps taken, restored by ``load_checkpoint``), which is how
DeepSpeed's engine advances its compression scheduler. Only that counter and the section are read, so
this works with any data-parallel strategy that keeps parameters whole (ZeRO stages 0, 1 and 2).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .compress import compression_scheduler, init_compression
from .errors import CompressionError

__all__ = ["build", "attach"]


def attach(module: nn.Module, global_steps) -> nn.Module:
    """Advance ``module``'s compression schedule from ``global_steps()`` before every forward."""
    scheduler = compression_scheduler(module)

    def advance(_module, _args):
        step = global_steps()
        if step != scheduler.training_steps:
            scheduler.set_step(step)

    module.register_forward_pre_hook(advance)
    return module


def build(ctx: Any, module: nn.Module) -> nn.Module:
    """The ``model_wrapper`` factory: ``ctx`` is ds-core's ``ModelContext`` (own section, the layout of
    the strategy that will take the parameters, a live reader of the optimizer steps taken)."""
    if ctx.strategy == "zero-3":
        raise CompressionError("compression_training works with ZeRO stages 0-2 (whole parameters on every rank); "
                               "the config asks for stage 3 (strategy layout 'zero-3'): use stage 2 or drop "
                               "compression_training")
    if getattr(module, "_ds_compression", None) is None:
        init_compression(module, ctx.section)
    return attach(module, ctx.global_steps)
