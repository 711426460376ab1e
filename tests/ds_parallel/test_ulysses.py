"""DeepSpeed-Ulysses ``DistributedAttention`` on 2 gloo ranks against full attention on one process.

Each rank holds half of the sequence (DeepSpeed's layouts: ``[s/p, b, h, d]`` with
``batch_dim_idx=1``, ``[b, s/p, h, d]`` with ``batch_dim_idx=0``); the local attention is
``scaled_dot_product_attention`` on full sequences of half the heads. Outputs and the gradients of
query, key and value must equal full attention's rows for this rank's positions to 1e-5, causal and
not, with as many KV heads as query heads and with one KV head (replicated before the exchange).
"""

import pytest
import torch
import torch.nn.functional as F

from ds_core.errors import ConfigError
from ds_core.testing.harness import run_distributed
from ds_parallel import DistributedAttention, TensorGroup
from ds_parallel.sequence.ulysses import replicate_kv_heads

B, S, H, D = 2, 8, 4, 8


def _full(q, k, v, causal):
    """Reference on [b, s, h, d]: SDPA with the KV heads repeated for grouped queries."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def _local(batch_first, causal):
    def attn(q, k, v):
        if not batch_first:  # [s, b, h, d] -> [b, s, h, d]
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out = _full(q, k, v, causal)
        return out if batch_first else out.transpose(0, 1)
    return attn


def _case(tg, causal, batch_first, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, S, kv_heads, D, generator=g, requires_grad=True)
    v = torch.randn(B, S, kv_heads, D, generator=g, requires_grad=True)
    ref = _full(q, k, v, causal)
    w = torch.randn(ref.shape, generator=g)
    (ref * w).sum().backward()
    chunk = S // tg.size
    rows = slice(tg.rank * chunk, (tg.rank + 1) * chunk)
    local = [t.detach()[:, rows].clone().requires_grad_() for t in (q, k, v)]
    inputs = local if batch_first else [t.detach().transpose(0, 1).contiguous().requires_grad_() for t in local]
    attn = DistributedAttention(_local(batch_first, causal), tg.group)
    out = attn(*inputs, 0 if batch_first else 1)
    out_bf = out if batch_first else out.transpose(0, 1)
    (out_bf * w[:, rows]).sum().backward()
    grads = [t.grad if batch_first else t.grad.transpose(0, 1) for t in inputs]
    return {"output": (out_bf.detach(), ref.detach()[:, rows]),
            **{f"d{n}": (gr, full.grad[:, rows]) for n, gr, full in zip("qkv", grads, (q, k, v))}}


CASES = [(c, bf, kv) for c in (True, False) for bf in (True, False) for kv in (H, 1)]


def _all():
    tg = TensorGroup.of(None)
    return {case: _case(tg, *case) for case in CASES}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_all, 2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'causal' if c[0] else 'full'}-"
                         f"{'bshd' if c[1] else 'sbhd'}-kv{c[2]}")
def test_ulysses_equals_full_attention(two_ranks, case):
    for rank in two_ranks:
        for name, (got, want) in rank[case].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_kv_heads_replicated_to_divide_and_query_heads_must_divide():
    kv = torch.randn(1, 3, 8, 4)  # 3 KV heads for 6 query heads over 2 ranks: lcm(3, 2) = 6 copies
    rep = replicate_kv_heads(kv, 6, 2, 1)
    assert rep.shape[1] == 6 and torch.equal(rep[:, 1], kv[:, 0])
    with pytest.raises(ConfigError, match="6 query heads do not split over 4 ranks"):
        replicate_kv_heads(kv, 6, 4, 1)
