"""ds-zero: ZeRO stages 1-3, CPU/NVMe offload, zero.Init, checkpoint consolidation."""

__version__ = "0.0.1"

__all__: list[str] = []
