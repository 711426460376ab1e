"""Moved to :mod:`ds_core.optim.lamb_lion`; this name stays importable (Lamb and Lion)."""

import sys

from ..optim import lamb_lion as _moved

sys.modules[__name__] = _moved
