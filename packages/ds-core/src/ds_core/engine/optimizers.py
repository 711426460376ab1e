"""Moved to :mod:`ds_core.optim.optimizers`; this name stays importable (the optimizer factory)."""

import sys

from ..optim import optimizers as _moved

sys.modules[__name__] = _moved
