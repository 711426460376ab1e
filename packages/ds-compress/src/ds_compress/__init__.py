"""ds-compress: quantization, pruning, layer reduction, distillation."""

__version__ = "0.0.1"

__all__: list[str] = []
