"""ds-infer: the inference engine.

``init_inference(model, config=None, **kwargs)`` (DeepSpeed's keys: ``tensor_parallel``, ``dtype``,
``checkpoint``, ``replace_with_kernel_inject``, ``max_out_tokens``, ``quant``, ``zero``) returns an
:class:`InferenceEngine`; ``engine.generate(...)`` / :func:`generate` is the decode loop. The native
models and the contract serving builds on live in :mod:`ds_infer.models`. Names below are imported on
first use, so ``import ds_infer`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "init_inference": "ds_infer.engine",
    "InferenceEngine": "ds_infer.engine",
    "InferenceConfig": "ds_infer.config",
    "generate": "ds_infer.generation",
    "GenerationConfig": "ds_infer.generation",
    "load_model": "ds_infer.models",
    "from_module": "ds_infer.models",
    "CausalLM": "ds_infer.models",
    "KVBackend": "ds_infer.models",
    "StaticKVCache": "ds_infer.models",
    "NoCache": "ds_infer.models",
    "QuantLinear": "ds_infer.quant",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ds_infer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
