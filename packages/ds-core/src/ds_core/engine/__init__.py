"""The training engine and its seam.

- ``initialize.py``: ``initialize`` (DeepSpeed's entry point) and the run's topology;
- ``engine.py``: :class:`Engine`, the forward / backward / step contract (a ``torch.nn.Module``);
- ``strategy.py``: the :class:`DataParallelStrategy` protocol, and ``replicated.py``, stage 0;
- ``step.py``: the step decision every strategy shares (norm, overflow agreement, clipping);
- ``context.py``: what components are given instead of the engine; ``hooks.py``: the engine hooks;
- ``components.py``: which feature provides what; ``checkpoint_layout.py`` + ``checkpoint.py``:
  what a checkpoint holds and the atomic directory protocol;
- ``reducer.py``, ``precision.py``: the bucketed all-reduce, flat gradients and loss scaling.

Optimizers and schedules live in :mod:`ds_core.optim`, monitors and timers in :mod:`ds_core.monitor`.
"""

from .context import ModelContext, TrainingContext
from .engine import Engine, NonFiniteLossError
from .hooks import EngineHooks, StepInfo
from .initialize import init_distributed, initialize
from .strategy import DataParallelStrategy, FullGradients, NormTerm

__all__ = ["initialize", "init_distributed", "Engine", "NonFiniteLossError", "DataParallelStrategy",
           "FullGradients", "NormTerm", "TrainingContext", "ModelContext", "EngineHooks", "StepInfo"]
