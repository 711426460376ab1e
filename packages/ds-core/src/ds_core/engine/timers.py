"""Moved to :mod:`ds_core.monitor.timers`; this name stays importable (wall-clock timers)."""

import sys

from ..monitor import timers as _moved

sys.modules[__name__] = _moved
