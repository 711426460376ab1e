"""ds-compress: compression training (quantization-aware training, pruning, layer reduction, knowledge
distillation) with DeepSpeed's ``compression_training`` config, and post-training quantization (RTN,
GPTQ, ZeroQuant, XTC) exported to the ds-quant format that ds-infer runs.

Everything quantizes through one group-wise quantizer (:mod:`ds_compress.quantizer`).
"""

from .compress import (
    CompressionScheduler,
    compression_scheduler,
    init_compression,
    redundancy_clean,
    student_initialization,
)
from .config import CompressionTrainingConfig, parse_compression_config
from .distill import hidden_mse_loss, layerwise_distill, logits_kd_loss
from .errors import CompressionError
from .export import load_quantized, save_quantized
from .layers import CompressedConv2d, CompressedLinear
from .ptq import quantize
from .qlinear import FakeQuantLinear, QuantizedLinear
from .quantizer import QuantizedWeight, QuantSpec, fake_quantize, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "init_compression",
    "redundancy_clean",
    "student_initialization",
    "compression_scheduler",
    "CompressionScheduler",
    "CompressionTrainingConfig",
    "parse_compression_config",
    "quantize",
    "save_quantized",
    "load_quantized",
    "logits_kd_loss",
    "hidden_mse_loss",
    "layerwise_distill",
    "QuantSpec",
    "QuantizedWeight",
    "quantize_weight",
    "fake_quantize",
    "QuantizedLinear",
    "FakeQuantLinear",
    "CompressedLinear",
    "CompressedConv2d",
    "CompressionError",
]
