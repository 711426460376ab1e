"""The training engine: ``initialize``, the engine, and the components it is assembled from."""

from .engine import Engine, NonFiniteLossError
from .initialize import init_distributed, initialize

__all__ = ["initialize", "init_distributed", "Engine", "NonFiniteLossError"]
