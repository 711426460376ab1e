"""Testing helpers: run code on N real gloo processes or N threads; shipped as a pytest plugin."""

from .harness import DEFAULT_TIMEOUT, DistributedTestError, free_port, run_distributed

__all__ = ["run_distributed", "DistributedTestError", "free_port", "DEFAULT_TIMEOUT"]
