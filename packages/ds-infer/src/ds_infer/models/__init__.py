"""Native causal-LM implementations for fast inference, and the contract serving builds on.

Families: Llama (Llama 2/3, Mistral, Qwen2, Qwen3 with q/k-norm; grouped-query attention; rotary
with the ``default``/``linear``/``dynamic``/``yarn``/``llama3``/``longrope`` scalings; sliding
windows), GPT-2, and the MoE variants Mixtral, Qwen2-MoE (gated shared expert) and Qwen3-MoE. Each
is built from a Hugging Face config (``config.json`` read directly: no ``transformers`` import)
and loads Hugging Face state-dict names from safetensors, so a ``save_pretrained`` directory loads.

The contract (stable; :mod:`ds_infer.serving` and the decode loop rely on it)
-------------------------------------------------------------------------------

1. ``hidden = model(input_ids, positions, kv)``

   ``input_ids``, ``positions``: long ``[B, T]``; positions are explicit per token (left padding,
   ragged batches and chunked prefill need nothing else). Returns the final-norm hidden states
   ``[B, T, hidden]``. Every attention layer hands its rotated heads to the backend ``kv``::

       out = kv.attend(layer_idx, q, k, v, scale=float, window=int | None)
       # q [B, T, Hq, D], k/v [B, T, Hkv, D] -> out [B, T, Hq, D]

   The backend stores k/v and attends causally over the sequence so far (:class:`KVBackend`).
   Backends here: :class:`StaticKVCache` (preallocated, capture-friendly decode step) and
   :class:`NoCache` (one forward, no state). A flat ragged batch is ``B = 1, T = all scheduled
   tokens``: the backend knows which sequence each token belongs to; the model does not care.

2. ``logits = model.compute_logits(hidden, rows=None)``

   fp32 ``[N, vocab]`` for the flattened rows ``rows`` (long ``[N]`` indices into ``B*T``) of
   ``hidden``; all rows when None. Serving asks only for each sequence's last token.

3. ``model = load_model(model_dir, dtype=None, quant=None, tp=None, device=None)``

   ``model_dir``: a ``save_pretrained`` directory (``config.json`` + ``*.safetensors``, sharded or
   not) or a ds-quant directory (docs/quantized-format.md). ``dtype``: compute dtype;
   ``quant``: ``"int8"``/``"int4"``/dict (quantize on load) or bitsandbytes; ``tp``: tensor-parallel
   size over the default process group (every rank calls it; each reads only its slices).
   ``model.kv_spec()`` says what a cache must hold per token on this rank (layers, kv heads, head
   dim, dtype, per-layer sliding windows).

``from_module(hf_model_or_gpt)`` builds the same native model from a model in memory.
"""

from .base import CausalLM
from .build import (
    MODEL_CLASSES,
    build_model,
    check_parallel,
    from_module,
    load_model,
    make_parallel,
    resolve_dtype,
)
from .config import SUPPORTED_MODEL_TYPES, ArchConfig, MoEConfig, RopeConfig, arch_from_hf, read_hf_config
from .kv import KVBackend, KVSpec, NoCache, StaticKVCache
from .layers import Parallel
from .sources import CheckpointError, DictSource, SafetensorsDir

__all__ = [
    "CausalLM", "load_model", "from_module", "build_model", "check_parallel", "make_parallel", "resolve_dtype",
    "ArchConfig", "RopeConfig", "MoEConfig", "arch_from_hf", "read_hf_config", "SUPPORTED_MODEL_TYPES",
    "MODEL_CLASSES", "KVBackend", "KVSpec", "NoCache", "StaticKVCache", "Parallel", "CheckpointError",
    "DictSource", "SafetensorsDir",
]
