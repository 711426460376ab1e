"""ds-infer: inference engine: tensor parallel, KV cache, quantized weights."""

__version__ = "0.0.1"

__all__: list[str] = []
