"""Parameter tags: expert-style parameters reduce over their own axis and keep per-rank values."""

import math

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.comm import Topology
from ds_core.errors import ConfigError
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
    torch.manual_seed(0)
    model = TwoPart()
    expert_init = model.expert.weight.detach().clone()
    engine, *_ = ds_core.initialize(model=model, topology=Topology(2, expert=2), config={
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 0, "gradient_clipping": 1e9,
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}}})
    assert engine.topology.size("expert") == 2
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
    # summed over expert_data (1 rank here), divided by the data-axis size like every gradient
    assert torch.allclose(model.expert.weight.grad, ref.expert.weight.grad / 2)

    expert_sq = (ref.expert.weight.grad / 2).pow(2).sum()
    dist.all_reduce(expert_sq)
    engine.step()
    expected = math.sqrt(float((shared / 2).pow(2).sum()) + float(expert_sq))
    assert abs(engine.get_global_grad_norm() - expected) < 1e-5 * expected, rank


def test_tags_default_and_validation():
    p = torch.nn.Parameter(torch.zeros(1))
    assert reduce_axis(p) == "data" and shard_axis(p) is None
    with pytest.raises(ValueError, match="axis 'experts' is not a topology axis"):
        tag_params([p], reduce_axis="experts")


class AsksForExperts(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in sizes)
        for layer, size in zip(self.layers, sizes):
            layer.ds_axes = {"expert": size}

    def forward(self, x):
        return sum(layer(x).sum() for layer in self.layers)


def test_conflicting_topology_requests_fail_before_any_group():
    with pytest.raises(ConfigError, match=r"layers layers\.0 and layers\.1 ask for expert=1 and expert=2"):
        ds_core.initialize(model=AsksForExperts([1, 2]), config=_CFG)
    with pytest.raises(ConfigError, match=r"layer layers\.0 needs expert=2 but the run's topology has expert=1"):
        ds_core.initialize(model=AsksForExperts([2]), config=_CFG, topology=Topology(1))


def test_topology_must_cover_the_world_before_any_group():
    from ds_core.errors import CommError

    with pytest.raises(CommError, match="pipe 2 × data 3 × sequence 1 × tensor 1 = 6 != world size 4"):
        Topology(4, pipe=2, data=3)
    was = torch.distributed.is_initialized()
    with pytest.raises(CommError, match=r"covers 4 ranks but 1 are running.*Topology\(1, \.\.\.\)"):
        ds_core.initialize(model=torch.nn.Linear(2, 2), config=_CFG, topology=Topology(4, pipe=2))
    assert torch.distributed.is_initialized() == was  # refused before any process group was created


class Experts(torch.nn.Module):
    """Experts named by global index: rank r of E expert ranks holds expert r (of E)."""

    def __init__(self, ids):
        super().__init__()
        self.shared = torch.nn.Linear(2, 2)
        self.experts = torch.nn.ModuleDict({str(i): torch.nn.Linear(2, 1) for i in ids})
        for e in self.experts.values():
            torch.nn.init.constant_(e.weight, 10.0 + int([k for k, v in self.experts.items() if v is e][0]))
            tag_params(e.parameters(), reduce_axis="expert_data", shard_axis="expert")

    def forward(self, x):
        h = self.shared(x)
        return sum(e(h).sum() for e in self.experts.values())


_CFG = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}


def _save_two_expert_ranks(path):
    engine, *_ = ds_core.initialize(model=Experts([dist.get_rank()]), config=_CFG, topology=Topology(2, expert=2))
    engine.backward(engine(torch.ones(1, 2)))
    engine.step()
    engine.save_checkpoint(path, tag="t")
    same, *_ = ds_core.initialize(model=Experts([dist.get_rank()]), config=_CFG, topology=Topology(2, expert=2))
    same.load_checkpoint(path, tag="t")  # same layout: optimizer state follows
    assert torch.equal(same.module.experts[str(dist.get_rank())].weight,
                       engine.module.experts[str(dist.get_rank())].weight)
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_sharded_parameters_reload_under_another_layout(distributed, tmp_path):
    states = distributed.run(_save_two_expert_ranks, 2, args=(str(tmp_path),))
    both, *_ = ds_core.initialize(model=Experts([0, 1]), config=_CFG)
    with pytest.raises(ds_core.engine.checkpoint.CheckpointError, match="load_optimizer_states=False"):
        both.load_checkpoint(tmp_path, tag="t")
    both.load_checkpoint(tmp_path, tag="t", load_optimizer_states=False)
    for rank in (0, 1):
        assert torch.equal(both.module.experts[str(rank)].weight, states[rank][f"experts.{rank}.weight"])
    assert torch.equal(both.module.shared.weight, states[0]["shared.weight"])
