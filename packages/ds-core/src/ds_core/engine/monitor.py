"""Moved to :mod:`ds_core.monitor.monitor`; this name stays importable (monitors, log line, throughput)."""

import sys

from ..monitor import monitor as _moved

sys.modules[__name__] = _moved
