"""Tensor-parallel layers on 2 gloo ranks against the dense layers on the same weights and inputs.

Reference: the unsharded ``nn.Linear`` / ``nn.Embedding`` / ``F.cross_entropy`` computed on every rank;
each rank's shard of the output and of every gradient must match the reference's rows to 1e-5
relative, 1e-6 absolute (fp32: the sharded sums add the same products in another order). The 2-rank
run happens once per module; each test checks one behaviour from its results.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_core.errors import CommError, ConfigError
from ds_core.testing.harness import run_distributed
from ds_parallel import (
    ColumnParallelLinear,
    KVHeads,
    Part,
    RowParallelLinear,
    TensorGroup,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from ds_parallel.layers import lm_head
from ds_parallel.shards import column_spec, take_runs


def close(pairs):
    for name, (a, b) in pairs.items():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _rows(grad, p):
    info = p.ds_tp
    return take_runs(grad, info.dim, info.runs)


def _mlp_and_embedding(tg):
    torch.manual_seed(0)
    up, down, emb = nn.Linear(8, 12), nn.Linear(12, 8), nn.Embedding(11, 8, padding_idx=3)  # 11 rows: 6 + 5
    x = torch.randn(2, 5, 8, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    ref = down(F.gelu(up(emb(ids) + x)))
    ref.square().sum().backward()
    col, row = ColumnParallelLinear.from_dense(up, tg), RowParallelLinear.from_dense(down, tg)
    vemb = VocabParallelEmbedding.from_embedding(emb, tg)
    x2 = x.detach().clone().requires_grad_()
    out = row(F.gelu(col(vemb(ids) + x2)))
    out.square().sum().backward()
    return {"output": (out, ref), "input grad": (x2.grad, x.grad),
            "column weight grad": (col.weight.grad, _rows(up.weight.grad, col.weight)),
            "column bias grad": (col.bias.grad, _rows(up.bias.grad, col.bias)),
            "row weight grad": (row.weight.grad, _rows(down.weight.grad, row.weight)),
            "row bias grad": (row.bias.grad, down.bias.grad),
            "embedding grad": (vemb.weight.grad, _rows(emb.weight.grad, vemb.weight)),
            "embedding rows": (torch.tensor(vemb.weight.shape[0]), torch.tensor((6, 5)[tg.rank]))}


def _fused_kv(tg):
    torch.manual_seed(1)
    x = torch.randn(3, 8)
    fused = nn.Linear(8, (4 + 2) * 2)  # 4 query heads and 1 KV head, head_dim 2
    parts = (Part(8, 2), KVHeads(1, 2, 4), KVHeads(1, 2, 4))
    layer = ColumnParallelLinear.from_dense(fused, tg, parts=parts)
    y = fused(x)
    expect = torch.cat([y[:, tg.rank * 4:(tg.rank + 1) * 4], y[:, 8:12]], dim=1)  # my 2 query heads, k, v
    gathered = ColumnParallelLinear.from_dense(fused, tg, parts=parts, gather_output=True)(x)
    shapes = torch.tensor([*layer.weight.shape, *layer.weight_replicated.shape])
    return {"local output": (layer(x), expect), "gathered output": (gathered, y),
            "shapes": (shapes, torch.tensor([4, 8, 4, 8]))}


def _kv_grad(tg):
    torch.manual_seed(2)
    k = nn.Linear(8, 2)  # one KV head of 2 for 4 query heads
    x = torch.randn(5, 8)
    layer = ColumnParallelLinear.from_dense(k, tg, parts=(KVHeads(1, 2, 4),))
    weights = torch.tensor([1.0, 3.0])  # each rank's query heads use the KV head differently
    (layer(x) * weights[tg.rank]).sum().backward()
    (k(x) * weights.sum()).sum().backward()  # the dense model: both ranks' uses
    return {"replicated KV weight grad": (layer.weight.grad, k.weight.grad)}


def _cross_entropy(tg):
    torch.manual_seed(3)
    head = nn.Linear(8, 11, bias=False)
    h = torch.randn(2, 5, 8)
    target = torch.randint(0, 11, (2, 5))
    target[0, 0] = -100
    sharded = lm_head(head, tg, gather_output=False)
    loss = vocab_parallel_cross_entropy(sharded(h), target, tg, vocab_start=sharded.spec.shard_runs[0][0])
    loss.backward()
    ref = F.cross_entropy(head(h).view(-1, 11), target.view(-1))
    ref.backward()
    full = lm_head(head, tg, gather_output=True)(h)
    return {"loss": (loss.detach(), ref.detach()),
            "head grad": (sharded.weight.grad, _rows(head.weight.grad, sharded.weight)),
            "gathered logits": (full.detach(), head(h).detach())}


def _all_checks():
    tg = TensorGroup.of(None)
    checks = {"mlp": _mlp_and_embedding(tg), "fused": _fused_kv(tg), "kv": _kv_grad(tg), "ce": _cross_entropy(tg)}
    return {k: {n: (a.detach(), b.detach()) for n, (a, b) in v.items()} for k, v in checks.items()}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_all_checks, 2)


@pytest.mark.smoke
def test_mlp_block_and_vocab_embedding_match_dense(two_ranks):
    for rank in two_ranks:
        close(rank["mlp"])


def test_fused_projection_split_per_part_with_replicated_kv(two_ranks):
    for rank in two_ranks:
        close(rank["fused"])


def test_replicated_kv_gradient_is_summed_over_the_group(two_ranks):
    for rank in two_ranks:
        close(rank["kv"])


def test_vocab_parallel_cross_entropy_and_gathered_head(two_ranks):
    for rank in two_ranks:
        close(rank["ce"])


def test_one_rank_is_the_dense_layer():
    torch.manual_seed(4)
    lin = nn.Linear(6, 4)
    x = torch.randn(2, 6)
    assert torch.equal(ColumnParallelLinear.from_dense(lin)(x), lin(x))
    torch.testing.assert_close(RowParallelLinear.from_dense(lin)(x), lin(x))


def test_offline_shard_builds_but_refuses_collectives():
    lin = nn.Linear(6, 4)
    shard = RowParallelLinear.from_dense(lin, TensorGroup(size=2, rank=1))
    assert torch.equal(shard.weight, lin.weight[:, 3:])
    with pytest.raises(CommError, match="built offline"):
        shard(torch.randn(1, 3))


def test_uneven_heads_are_refused_with_the_numbers():
    with pytest.raises(ConfigError, match="6 query heads cannot be split over tensor-parallel size 4"):
        column_spec((KVHeads(2, 8, 6),), 4, 0)
    with pytest.raises(ConfigError, match="size of size 12 cannot be split evenly over tensor-parallel size 5"):
        column_spec((Part(12, 1, "size"),), 5, 0)
