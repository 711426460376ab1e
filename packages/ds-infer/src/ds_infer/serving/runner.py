"""Runs one step's forward: the plan (plain data, the same on every tensor-parallel rank) in, the
logits of the rows to sample out.

The scheduler lives on rank 0 only; what a rank needs to run a step is the :class:`StepPlan`, so
tensor-parallel serving broadcasts it and every rank executes it against its own shard of the
weights and of the KV cache (the block tables are the same everywhere: a rank's cache holds its
own KV heads of every block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import build_metadata
from .kv_cache import PagedAttention, PagedKVCache

__all__ = ["StepPlan", "ModelRunner"]


@dataclass
class StepPlan:
    """One forward: tokens, where their sequences' KV lives, which rows to sample, block copies."""

    input_ids: list[int] = field(default_factory=list)
    chunks: list[tuple[list[int], int, int]] = field(default_factory=list)  # (block table, computed, new)
    sample_rows: list[int] = field(default_factory=list)
    swap_out: list[tuple[int, list[int]]] = field(default_factory=list)  # (sequence id, blocks) to host
    swap_in: list[tuple[int, list[int]]] = field(default_factory=list)  # (sequence id, blocks) from host
    drop_swapped: list[int] = field(default_factory=list)  # host copies no longer needed
    pause: bool = False  # launched tensor-parallel workers: the offline batch is over
    shutdown: bool = False  # tensor-parallel workers leave their loop


class ModelRunner:
    """The model, its paged KV cache and the host copies of swapped-out sequences, on one rank."""

    def __init__(self, model, cache: PagedKVCache, *, use_op: bool = False) -> None:
        self.model = model
        self.cache = cache
        self.use_op = use_op
        self.device = cache.device
        self.swapped: dict[int, Tensor] = {}

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Tensor | None:
        for seq_id in plan.drop_swapped:
            self.swapped.pop(seq_id, None)
        for seq_id, blocks in plan.swap_out:  # before anything overwrites the released blocks
            self.swapped[seq_id] = self.cache.copy_out(blocks)
        for seq_id, blocks in plan.swap_in:
            self.cache.copy_in(self.swapped.pop(seq_id), blocks)
        if not plan.chunks:
            return None
        meta = build_metadata(plan.chunks, self.cache.block_size, self.device, num_kv_heads=self.cache.num_kv_heads,
                              with_torch_path=not self.use_op)  # fmt: skip
        input_ids = torch.tensor(plan.input_ids, dtype=torch.long, device=self.device)
        kv = PagedAttention(self.cache, meta, use_op=self.use_op)
        hidden = self.model(input_ids[None], meta.positions[None], kv)
        if not plan.sample_rows:
            return None
        rows = torch.tensor(plan.sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden, rows)
