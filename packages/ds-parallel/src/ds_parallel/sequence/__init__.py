"""Sequence parallelism: Ulysses all-to-all attention, Hugging Face integration, data sharding, tiling."""

from .data import SequenceShardedLoader, sequence_parallel_loss, shard_batch
from .hf import ATTENTION_NAME, register_ulysses_attention, sequence_group, sequence_parallel
from .ulysses import DistributedAttention, seq_all_to_all

__all__ = ["DistributedAttention", "seq_all_to_all", "shard_batch", "SequenceShardedLoader",
           "sequence_parallel_loss", "sequence_parallel", "register_ulysses_attention", "sequence_group",
           "ATTENTION_NAME"]
