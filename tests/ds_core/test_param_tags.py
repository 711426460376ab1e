"""Parameter tags: expert-style parameters reduce over their own axis and keep per-rank values."""

import math

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.comm import ensure_topology, get_topology, set_topology
from ds_core.errors import CommError
from ds_core.params import reduce_axis, shard_axis, tag_params


class TwoPart(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(3, 3, bias=False)
        torch.manual_seed(100 + dist.get_rank())  # experts differ per rank
        self.expert = torch.nn.Linear(3, 1, bias=False)
        tag_params(self.expert.parameters(), reduce_axis="expert_data", shard_axis="expert")

    def forward(self, x):
        return self.expert(self.shared(x)).sum()


@pytest.mark.world_size(2)
def test_expert_gradients_stay_local_and_norm_spans_experts():
    set_topology(None)
    ensure_topology(expert=2)
    torch.manual_seed(0)
    model = TwoPart()
    expert_init = model.expert.weight.detach().clone()
    engine, *_ = ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 0, "gradient_clipping": 1e9,
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}}})
    assert get_topology().size("expert") == 2
    assert torch.equal(model.expert.weight, expert_init)  # not overwritten by rank 0's expert
    x = torch.ones(1, 3) * (dist.get_rank() + 1)
    engine.backward(engine(x))

    rank = dist.get_rank()
    # reference: local gradients of both parts on every rank
    ref = TwoPart()
    ref.load_state_dict(model.state_dict())
    ref(x).backward()
    shared = ref.shared.weight.grad.clone()
    dist.all_reduce(shared)
    assert torch.allclose(model.shared.weight.grad, shared / 2)
    assert torch.allclose(model.expert.weight.grad, ref.expert.weight.grad)  # expert_data has 1 rank

    expert_sq = ref.expert.weight.grad.pow(2).sum()
    dist.all_reduce(expert_sq)
    engine.step()
    expected = math.sqrt(float((shared / 2).pow(2).sum()) + float(expert_sq))
    assert abs(engine.get_global_grad_norm() - expected) < 1e-5 * expected, rank


def test_tags_default_and_validation():
    p = torch.nn.Parameter(torch.zeros(1))
    assert reduce_axis(p) == "data" and shard_axis(p) is None
    with pytest.raises(ValueError, match="axis 'experts' is not a topology axis"):
        tag_params([p], reduce_axis="experts")


def test_conflicting_topology_request():
    set_topology(None)
    ensure_topology(expert=1)
    with pytest.raises(CommError, match="expert=2 was requested but the current topology has expert=1"):
        ensure_topology(expert=2)
    set_topology(None)
