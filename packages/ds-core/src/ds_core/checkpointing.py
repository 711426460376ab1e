"""Moved to :mod:`ds_core.activation_checkpointing`; this name stays importable (DeepSpeed's ``deepspeed.checkpointing`` is activation checkpointing)."""

import sys

from . import activation_checkpointing as _moved

sys.modules[__name__] = _moved
