"""Block allocation, reference counts, prefix lookup and LRU eviction of the paged KV cache."""

from __future__ import annotations

import pytest

from ds_infer.serving.block_manager import BlockManager
from ds_infer.serving.sampling_params import SamplingParams
from ds_infer.serving.sequence import Sequence


def _seq(tokens, name="r"):
    return Sequence(name, list(tokens), SamplingParams())


def _compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What a step does: blocks for n more tokens, the tokens computed, full blocks registered."""
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)


def test_allocate_covers_tokens_and_free_returns_everything():
    bm = BlockManager(8, 4)
    seq = _seq(range(10))
    assert bm.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and len(set(seq.block_ids)) == 3
    assert bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_ids == []
    bm.check_invariants()


def test_allocation_failure_changes_nothing():
    bm = BlockManager(3, 4)
    a, b = _seq(range(8), "a"), _seq(range(100, 108), "b")
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 8)  # needs 2, 1 free
    assert b.block_ids == [] and bm.num_free_blocks == 1
    bm.check_invariants()


def test_watermark_applies_to_admission_only():
    bm = BlockManager(10, 4, watermark=0.2)  # 2 blocks kept back from new requests
    a = _seq(range(40), "a")
    assert not bm.allocate(a, 36, admit=True)  # 9 blocks + 2 reserved > 10
    assert bm.allocate(a, 32, admit=True)  # 8 + 2 <= 10
    a.num_computed_tokens = 32
    assert bm.allocate(a, 8)  # a running request may grow into the reserve
    assert bm.num_free_blocks == 0


def test_shared_prefix_is_found_and_reference_counted():
    bm = BlockManager(16, 4)
    first = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "first")
    _compute(bm, first, 10)  # blocks [1-4] [5-8] full and cached, [9,10] partial
    second = _seq([1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97], "second")
    prefix = bm.lookup_prefix(second)
    assert prefix == first.block_ids[:2]
    assert bm.allocate(second, 3, prefix)
    assert second.num_computed_tokens == 8 and second.block_ids[:2] == first.block_ids[:2]
    assert [bm.ref_count(b) for b in first.block_ids[:2]] == [2, 2]
    bm.free(first)
    assert [bm.ref_count(b) for b in second.block_ids[:2]] == [1, 1]
    bm.free(second)
    assert bm.num_free_blocks == 16
    bm.check_invariants()


def test_prefix_lookup_leaves_the_last_token_to_compute():
    bm = BlockManager(16, 4)
    _compute(bm, _seq(range(8), "a"), 8)
    same = _seq(range(8), "b")
    assert len(bm.lookup_prefix(same)) == 1  # 8 tokens cached, but the last block is recomputed
    longer = _seq(range(9), "c")
    assert len(bm.lookup_prefix(longer)) == 2


def test_prefix_differs_after_a_changed_token():
    bm = BlockManager(16, 4)
    _compute(bm, _seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"), 9)
    # the same second block's tokens behind a different first block: a different chained hash
    assert bm.lookup_prefix(_seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")) == []
    assert len(bm.lookup_prefix(_seq([1, 2, 3, 4, 0, 6, 7, 8, 9], "c"))) == 1


def test_disabled_prefix_caching_finds_nothing():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    _compute(bm, _seq(range(9), "a"), 9)
    assert bm.lookup_prefix(_seq(range(9), "b")) == [] and bm.num_cached_blocks == 0


def test_released_cached_blocks_survive_until_needed_then_go_least_recent_first():
    bm = BlockManager(4, 2)
    old, new = _seq([1, 2, 3], "old"), _seq([7, 8, 9], "new")
    _compute(bm, old, 3)  # block of [1,2] cached
    _compute(bm, new, 3)  # block of [7,8] cached
    bm.free(old)  # released first: least recently used
    bm.free(new)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # never-hashed free blocks are handed out before any cached one
    filler = _seq([5, 5, 5], "filler")
    assert bm.allocate(filler, 3)
    assert bm.num_cached_blocks == 2
    filler.num_computed_tokens = 3
    # the next block has to evict: the least recently released cached block goes first
    assert bm.allocate(filler, 2)
    assert len(bm.lookup_prefix(_seq([1, 2, 3], "x"))) == 0
    assert len(bm.lookup_prefix(_seq([7, 8, 9], "y"))) == 1
    bm.check_invariants()


def test_claiming_a_released_cached_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(4, 2)
    a = _seq([1, 2, 3], "a")
    _compute(bm, a, 3)
    bm.free(a)
    b = _seq([1, 2, 4, 4], "b")
    prefix = bm.lookup_prefix(b)
    assert len(prefix) == 1 and bm.num_free_blocks == 4
    assert bm.allocate(b, 2, prefix)
    assert bm.num_free_blocks == 2 and bm.ref_count(prefix[0]) == 1
    bm.check_invariants()


def test_swap_out_releases_and_swap_in_takes_fresh_blocks():
    bm = BlockManager(6, 2)
    seq = _seq(range(5), "s")
    _compute(bm, seq, 5)
    held = list(seq.block_ids)
    assert bm.swap_out(seq) == held and bm.num_free_blocks == 6
    blocks = bm.swap_in(seq, 3)
    assert blocks is not None and len(blocks) == 3 and seq.block_ids == blocks
    assert bm.swap_in(_seq(range(20), "big"), 4) is None  # only 3 free
    bm.check_invariants()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 16)


def test_reset_prefix_cache_forgets_only_unused_blocks():
    bm = BlockManager(8, 2)
    kept, dropped = _seq([1, 2, 3], "kept"), _seq([7, 8, 9], "dropped")
    _compute(bm, kept, 3)
    _compute(bm, dropped, 3)
    bm.free(dropped)
    assert bm.reset_prefix_cache() == 1
    assert bm.lookup_prefix(_seq([7, 8, 9], "x")) == [] and len(bm.lookup_prefix(_seq([1, 2, 3], "y"))) == 1
    assert bm.num_free_blocks == 6
    bm.check_invariants()
