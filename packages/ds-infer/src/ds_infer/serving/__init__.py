"""Serving: a paged KV cache, continuous batching with split prefill, prefix caching, an offline
``LLM`` API and an OpenAI-compatible server (``ds serve``).

Layers, bottom up: :mod:`.block_manager` (blocks, block tables, prefix cache) and :mod:`.scheduler`
(which tokens run each step) know nothing of tensors; :mod:`.kv_cache` and :mod:`.attention` hold
and read the cache; :mod:`.runner` runs a step's forward; :mod:`.engine` ties them with the sampler
and detokenizer; :mod:`.llm` is the offline API; :mod:`.async_engine`, :mod:`.api_server` and
:mod:`.cli` are the server (the ``serve`` extra: FastAPI + uvicorn). Names below import lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLM": "ds_infer.serving.llm",
    "SamplingParams": "ds_infer.serving.sampling_params",
    "RequestError": "ds_infer.serving.sampling_params",
    "ServingConfig": "ds_infer.serving.config",
    "LLMEngine": "ds_infer.serving.engine",
    "RequestOutput": "ds_infer.serving.outputs",
    "CompletionOutput": "ds_infer.serving.outputs",
    "AsyncEngine": "ds_infer.serving.async_engine",
    "start_server": "ds_infer.serving.api_server",
    "build_app": "ds_infer.serving.api_server",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ds_infer.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
