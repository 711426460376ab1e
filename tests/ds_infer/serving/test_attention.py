"""Paged attention over block tables equals dense causal attention per sequence.

Reference: ``scaled_dot_product_attention`` on each sequence's contiguous keys/values with the
causal (and sliding-window) mask; fp32, tolerance 1e-5 (same math, different reduction order).
The batch mixes prefill chunks with and without earlier context and decode tokens, grouped-query
heads, blocks scattered in a shuffled order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_infer.serving.attention import build_metadata
from ds_infer.serving.kv_cache import PagedAttention, PagedKVCache

TOL = dict(atol=1e-5, rtol=1e-5)
BLOCK = 4
HQ, HKV, D = 4, 2, 8


def _batch(cases, seed=0):
    """(context, new tokens) per sequence -> cache with the earlier context filled, step inputs, dense refs."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-ctx // BLOCK) for ctx, _ in cases) + 3
    cache = PagedKVCache(1, num_blocks, BLOCK, HKV, D, torch.float32, "cpu")
    order = torch.randperm(num_blocks, generator=g).tolist()
    chunks, full_k, full_v, qs, ks, vs = [], [], [], [], [], []
    for ctx, new in cases:
        n = -(-ctx // BLOCK)
        table, order = order[:n], order[n:]
        k = torch.randn(ctx, HKV, D, generator=g)
        v = torch.randn(ctx, HKV, D, generator=g)
        for p in range(ctx - new):  # earlier steps already wrote these
            slot = table[p // BLOCK] * BLOCK + p % BLOCK
            cache.k[0][slot], cache.v[0][slot] = k[p], v[p]
        chunks.append((table, ctx - new, new))
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(new, HQ, D, generator=g))
        ks.append(k[ctx - new:])
        vs.append(v[ctx - new:])
    return cache, chunks, torch.cat(qs), torch.cat(ks), torch.cat(vs), full_k, full_v


def _dense(cases, q, full_k, full_v, scale, window):
    out, row = [], 0
    for (ctx, new), k, v in zip(cases, full_k, full_v):
        qs = q[row:row + new].transpose(0, 1)[None]
        kk = k.repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None]
        vv = v.repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None]
        diff = torch.arange(ctx - new, ctx)[:, None] - torch.arange(ctx)[None, :]
        mask = (diff >= 0) & (diff < window) if window else diff >= 0
        out.append(F.scaled_dot_product_attention(qs, kk, vv, attn_mask=mask, scale=scale)[0].transpose(0, 1))
        row += new
    return torch.cat(out)


CASES = {
    "mixed": [(9, 9), (13, 1), (6, 3), (1, 1), (17, 1), (12, 5)],
    "decode_only": [(5, 1), (16, 1), (3, 1)],
    "prefill_only": [(8, 8), (11, 4)],
    # enough decode rows to be split into groups by context length, mixed with a prefill chunk
    "many_decodes": [((7 * i) % 37 + 1, 1) for i in range(20)] + [(10, 6)] + [(3 * i + 2, 1) for i in range(6)],
}


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention_matches_dense(name, window):
    cases = CASES[name]
    cache, chunks, q, k, v, full_k, full_v = _batch(cases)
    meta = build_metadata(chunks, BLOCK, "cpu", num_kv_heads=HKV)
    out = PagedAttention(cache, meta).attend(0, q[None], k[None], v[None], scale=0.3, window=window)[0]
    torch.testing.assert_close(out, _dense(cases, q, full_k, full_v, 0.3, window), **TOL)
    # the step's keys and values landed in their slots
    for (table, start, new), kk in zip(chunks, full_k):
        for p in range(start, start + new):
            torch.testing.assert_close(cache.k[0][table[p // BLOCK] * BLOCK + p % BLOCK], kk[p])


@pytest.mark.parametrize("window", [None, 3])
def test_ds_ops_default_matches_torch_path(window):
    pytest.importorskip("ds_ops", reason="ds-ops is not installed; the op path is not available")
    cases = CASES["mixed"]
    cache, chunks, q, k, v, full_k, full_v = _batch(cases, seed=1)
    meta = build_metadata(chunks, BLOCK, "cpu", num_kv_heads=HKV)
    out = PagedAttention(cache, meta, use_op=True).attend(0, q[None], k[None], v[None], scale=0.3, window=window)[0]
    torch.testing.assert_close(out, _dense(cases, q, full_k, full_v, 0.3, window), **TOL)


def test_many_decode_rows_are_grouped_by_context_length():
    cache, chunks, *_ = _batch(CASES["many_decodes"])
    meta = build_metadata(chunks, BLOCK, "cpu", num_kv_heads=HKV)
    assert len(meta.decode_groups) == 3 and not meta.decode_all
    lengths = [g.ctx.tolist() for g in meta.decode_groups]
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))  # sorted: little padding per group
    assert sorted(r for g in meta.decode_groups for r in g.rows.tolist()) == [
        i for i, (_, _, n) in enumerate(chunks) if n == 1 and i < 20] + list(range(26, 32))


def test_swap_copies_round_trip():
    cache, chunks, *_ = _batch(CASES["mixed"], seed=2)
    blocks = chunks[0][0]
    host = cache.copy_out(blocks)
    before = [cache.k[0].clone(), cache.v[0].clone()]
    spare = [b for b in range(cache.num_blocks) if all(b not in t for t, _, _ in chunks)]
    assert len(spare) >= len(blocks)
    spare = spare[: len(blocks)]
    cache.copy_in(host, spare)
    for src, dst in zip(blocks, spare):
        rows = slice(dst * BLOCK, (dst + 1) * BLOCK)
        torch.testing.assert_close(cache.k[0][rows], before[0][src * BLOCK:(src + 1) * BLOCK])
        torch.testing.assert_close(cache.v[0][rows], before[1][src * BLOCK:(src + 1) * BLOCK])
