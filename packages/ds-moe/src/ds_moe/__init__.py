"""ds-moe: mixture of experts: top-k gating, expert parallelism."""

__version__ = "0.0.1"

__all__: list[str] = []
