"""Accelerators: the protocol, the built-ins and the once-per-process selection."""

from .base import CAPABILITIES, Accelerator, TorchAccelerator
from .select import available_accelerators, get_accelerator, set_accelerator

__all__ = [
    "Accelerator",
    "TorchAccelerator",
    "CAPABILITIES",
    "get_accelerator",
    "set_accelerator",
    "available_accelerators",
]
