"""The training dataloader: each data-parallel rank reads its own shard, micro-batch sized."""

from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["build_dataloader"]


def build_dataloader(dataset, micro_batch_size: int, dp_size: int, dp_rank: int, seed: int = 0,
                     collate_fn=None, shuffle: bool = True, num_workers: int = 0) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle,
                                 seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn,
                      drop_last=True, num_workers=num_workers)
