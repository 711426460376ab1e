"""Quantized weights: the ds-quant layout, ``QuantLinear``, quantize-on-load and bitsandbytes."""

from .factory import BnbFactory, QuantSpec, RTNFactory, factory_for, parse_quant
from .linear import QuantLinear, quantize_activations, woq_linear_reference
from .pack import dequantize, pack, quantize_rtn, unpack

__all__ = ["QuantLinear", "QuantSpec", "RTNFactory", "BnbFactory", "factory_for", "parse_quant",
           "woq_linear_reference", "quantize_activations", "dequantize", "pack", "unpack", "quantize_rtn"]
