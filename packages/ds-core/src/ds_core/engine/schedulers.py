"""Moved to :mod:`ds_core.optim.schedulers`; this name stays importable (the learning-rate schedules)."""

import sys

from ..optim import schedulers as _moved

sys.modules[__name__] = _moved
