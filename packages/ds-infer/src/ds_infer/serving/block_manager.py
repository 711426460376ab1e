"""The paged KV cache's bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots each (the tensors live in
:mod:`ds_infer.serving.kv_cache`). A sequence owns an ordered *block table*; token ``i`` of the
sequence lives in slot ``i % block_size`` of block ``table[i // block_size]`` (Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with PagedAttention", 2023).

Prefix caching: once every slot of a block is computed, the block is named by a hash of its tokens
chained with the hash of the block before it, so equal hashes mean equal token prefixes and equal
KV contents. A later sequence whose prompt starts with the same tokens takes those blocks instead
of recomputing them; blocks are reference-counted, and a block nobody references stays cached until
its memory is needed, the least recently released going first.

[Note: hashed blocks are immutable] A sequence writes only the slots of tokens at or past its
``num_computed_tokens``, and a shared prefix ends at a block boundary below that, so no sequence ever
writes into a block another one reads. A sequence whose whole prompt is cached still recomputes its
last block (it needs the logits of its last token), which is why :meth:`BlockManager.lookup_prefix`
stops one token short of the prompt's end.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence

__all__ = ["BlockManager", "hash_block", "NoFreeBlocksError"]


class NoFreeBlocksError(RuntimeError):
    """Asked for more blocks than are free; the scheduler checks first, so this is a bug if raised."""


def hash_block(parent: bytes | None, tokens: Seq[int]) -> bytes:
    """Content hash of one full block: its tokens chained with the previous block's hash."""
    digest = hashlib.blake2b(parent or b"\0", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    """Allocates KV blocks to sequences, shares cached prefixes, frees and evicts.

    Free blocks sit in two pools: never-hashed ones (used first) and cached ones that nobody
    references, in least-recently-released order (evicted first when the first pool is empty).
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 watermark: float = 0.0) -> None:  # fmt: skip
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_blocks)
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    # --- state ----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # --- prefix cache ---------------------------------------------------------------------------

    def _update_hashes(self, seq: Sequence) -> None:
        tokens, size = seq.token_ids, self.block_size
        hashes = seq.block_hashes
        while (len(hashes) + 1) * size <= len(tokens):
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * size:(i + 1) * size]))

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of ``seq``'s tokens (at most all but its last
        token); nothing is claimed until :meth:`allocate` is given them."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(seq)
        limit = (len(seq.token_ids) - 1) // self.block_size
        blocks: list[int] = []
        for h in seq.block_hashes[:limit]:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def reset_prefix_cache(self) -> int:
        """Forget every cached block nobody references (they become plain free blocks); blocks in
        use keep their hashes. Returns how many were dropped."""
        dropped = 0
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash[block]]
            self._hash[block] = None
            self._free.append(block)
            dropped += 1
        return dropped

    # --- allocation -----------------------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            h = self._hash[block]
            if h is not None and self._cached.get(h) == block:
                del self._cached[h]
            self._hash[block] = None
        else:
            raise NoFreeBlocksError("no free KV block")
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        ref = self._ref[block] - 1
        if ref < 0:
            raise RuntimeError(f"KV block {block} released more often than it was taken")
        self._ref[block] = ref
        if ref == 0:
            if self._hash[block] is not None:
                self._evictable[block] = None  # most recently released: evicted last
            else:
                self._free.append(block)

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: Seq[int] = (),
                 admit: bool = False) -> bool:  # fmt: skip
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens past its computed ones.

        ``prefix_blocks`` (from :meth:`lookup_prefix`, only for a sequence with no blocks) are taken
        first and count as computed (``seq.num_computed_tokens`` moves past them). ``admit`` keeps the watermark free (new requests must not eat the
        blocks running ones will grow into). Returns False, changing nothing, when the blocks are not
        there.
        """
        if prefix_blocks and seq.block_ids:
            raise RuntimeError(f"prefix blocks given to sequence {seq.seq_id} which already holds blocks")
        num_tokens = seq.num_computed_tokens + len(prefix_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_for(num_tokens) - len(seq.block_ids) - len(prefix_blocks)
        # claiming a cached block that nobody references also takes it out of the free pools
        reclaimed = sum(1 for b in prefix_blocks if self._ref[b] == 0)
        reserve = self.watermark_blocks if admit else 0
        if max(needed, 0) + reclaimed + reserve > self.num_free_blocks:
            return False
        for block in prefix_blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            seq.block_ids.append(block)
        if prefix_blocks:
            seq.num_cached_blocks = len(prefix_blocks)
            seq.num_computed_tokens = len(prefix_blocks) * self.block_size
        for _ in range(needed):
            seq.block_ids.append(self._take())
        return True

    def commit(self, seq: Sequence) -> None:
        """Register ``seq``'s fully computed blocks in the prefix cache (call after each step)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if full <= seq.num_cached_blocks:
            return
        self._update_hashes(seq)
        for i in range(seq.num_cached_blocks, full):
            block, h = seq.block_ids[i], seq.block_hashes[i]
            if self._hash[block] is None and h not in self._cached:
                self._hash[block] = h
                self._cached[h] = block
            # else: the same content is already cached in another block; this copy stays private
        seq.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (tail first, so a prefix outlives its own suffix in the cache)."""
        for block in reversed(seq.block_ids):
            self._release(block)
        seq.block_ids.clear()
        seq.num_cached_blocks = 0

    # --- swapping -------------------------------------------------------------------------------

    def swap_out(self, seq: Sequence) -> list[int]:
        """The blocks whose contents must be copied to host before they are released (done here)."""
        blocks = list(seq.block_ids)
        self.free(seq)
        return blocks

    def swap_in(self, seq: Sequence, num_blocks: int) -> list[int] | None:
        """Fresh blocks for a swapped-out sequence's ``num_blocks`` blocks, or None if not free."""
        if seq.block_ids:
            raise RuntimeError(f"sequence {seq.seq_id} swapped in while holding blocks")
        if num_blocks + self.watermark_blocks > self.num_free_blocks:
            return None
        seq.block_ids.extend(self._take() for _ in range(num_blocks))
        seq.num_cached_blocks = 0
        return list(seq.block_ids)

    def check_invariants(self) -> None:
        """Every block is either referenced or in exactly one free pool; hashes map both ways."""
        free = set(self._free)
        evictable = set(self._evictable)
        assert not free & evictable, "a block is in both free pools"
        for block in range(self.num_blocks):
            in_pool = block in free or block in evictable
            assert (self._ref[block] == 0) == in_pool, f"block {block}: ref {self._ref[block]}, pooled {in_pool}"
        for h, block in self._cached.items():
            assert self._hash[block] == h, f"cache entry for block {block} disagrees with its hash"
