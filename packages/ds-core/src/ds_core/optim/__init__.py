"""Optimizers and learning-rate schedules: the config's ``optimizer`` and ``scheduler`` sections.

``build_optimizer`` (``optimizers.py``) picks a ``torch.optim`` class, a kernel optimizer from the op
registry or Lamb/Lion (``lamb_lion.py``); ``build_scheduler`` (``schedulers.py``) builds DeepSpeed's
schedules; ``fused.py`` is the fused-step contract (unscale/clip coefficient and 16-bit copy inside the
optimizer's pass) that data-parallel strategies use.
"""

from .fused import copy_target, fuses
from .lamb_lion import Lamb, Lion
from .optimizers import build_optimizer, describe, kernel_optimizer_class
from .schedulers import build_scheduler

__all__ = ["build_optimizer", "build_scheduler", "describe", "kernel_optimizer_class", "Lamb", "Lion", "fuses",
           "copy_target"]
