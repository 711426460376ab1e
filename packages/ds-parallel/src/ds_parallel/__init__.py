"""ds-parallel: tensor parallelism (AutoTP) and sequence parallelism (Ulysses, long-context tiling).

Tensor parallelism (Megatron-style, DeepSpeed's AutoTP): column-/row-parallel linear layers and a
vocabulary-parallel embedding and head over the ``tensor`` axis, sharding plans taken from a Hugging
Face model's own ``tp_plan`` or found from its structure, applied to a built model or to one built on
the meta device with each rank reading only its slices from safetensors files.

Everything here loads lazily: ``import ds_parallel`` costs nothing until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # tensor-parallel layers and collectives
    "TensorGroup": "comm",
    "tensor_group": "comm",
    "copy_to_group": "comm",
    "reduce_from_group": "comm",
    "gather_from_group": "comm",
    "scatter_to_group": "comm",
    "ColumnParallelLinear": "layers",
    "RowParallelLinear": "layers",
    "VocabParallelEmbedding": "layers",
    "shard_info": "layers",
    "use_shard_names": "layers",
    "vocab_parallel_cross_entropy": "loss",
    "Part": "shards",
    "KVHeads": "shards",
    "GroupedQKV": "shards",
    "VocabPart": "shards",
    "ShardInfo": "shards",
    "sum_gradient_over": "grads",
    # plans
    "Style": "plan",
    "TPPlan": "plan",
    "AttentionHeads": "plan",
    "find_plan": "plan",
    "apply_plan": "apply",
    "tensor_parallel": "apply",
    "meta_init": "loading",
    "load_sharded": "loading",
    "from_pretrained": "loading",
    "SafetensorsCheckpoint": "loading",
    "load_tp_checkpoint": "checkpoint",
    # sequence parallelism
    "DistributedAttention": "sequence.ulysses",
    "seq_all_to_all": "sequence.ulysses",
    "shard_batch": "sequence.data",
    "SequenceShardedLoader": "sequence.data",
    "sequence_parallel_loss": "sequence.data",
    "sequence_parallel": "sequence.hf",
    "register_ulysses_attention": "sequence.hf",
    "sequence_group": "sequence.hf",
    "sequence_tiled_compute": "sequence.tiling",
    "tile_mlp": "sequence.tiling",
    "tile_mlps": "sequence.tiling",
    "tiled_lm_loss": "sequence.tiling",
    "tiled_causal_lm_loss": "sequence.tiling",
    "PeakMemory": "memory",
    "saved_activation_bytes": "memory",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ds_parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
