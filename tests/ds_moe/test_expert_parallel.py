"""ep_size 2 on 2 ranks equals ep_size 1 on one process with the same global experts and tokens."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ds_core import comm
from ds_core.errors import ConfigError
from ds_core.params import reduce_axis, shard_axis
from ds_moe import MoE

D, E = 8, 4


def _expert():
    return nn.Sequential(nn.Linear(D, 12), nn.GELU(), nn.Linear(12, D))


def _reference(**kw):
    """All E experts, distinct weights; the same on every rank (seeded)."""
    torch.manual_seed(0)
    ref = MoE(D, _expert(), num_experts=E, ep_size=1, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return ref


def _check_parity(**kw):
    ref = _reference(**kw)
    moe = MoE(D, _expert(), num_experts=E, ep_size=2, **kw)
    assert moe.ds_axes == {"expert": 2} and comm.get_world_size(moe._expert_group()) == 2
    rank = dist.get_rank()
    assert list(moe.experts.experts) == [str(2 * rank), str(2 * rank + 1)]
    p = next(iter(moe.experts.parameters()))
    assert (reduce_axis(p), shard_axis(p)) == ("expert_data", "expert")
    missing, unexpected = moe.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and all(k.startswith("experts.experts.") for k in unexpected)

    torch.manual_seed(10)
    xs = [torch.randn(2, 7, D) for _ in range(2)]  # rank r's tokens are xs[r]
    x = xs[rank].clone().requires_grad_()
    y, l_aux, counts = moe(x)
    (y.pow(2).sum() + l_aux).backward()

    ref_out = []
    for r in range(2):  # the one-process reference sees both ranks' tokens, one batch at a time
        xr = xs[r].clone().requires_grad_()
        yr, lr, cr = ref(xr)
        (yr.pow(2).sum() + lr).backward()
        ref_out.append((yr, lr, cr, xr.grad))
    yr, lr, cr, gr = ref_out[rank]
    assert torch.allclose(y, yr, atol=1e-5) and torch.allclose(l_aux, lr, atol=1e-6)
    assert torch.equal(counts, cr)
    assert torch.allclose(x.grad, gr, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, prm in moe.experts.named_parameters():  # experts see both ranks' tokens
        assert torch.allclose(prm.grad, ref_params["experts." + name].grad, atol=1e-5), name
    gate = moe.gate.wg.weight.grad.clone()
    dist.all_reduce(gate)  # the gate sees each rank's own tokens
    assert torch.allclose(gate, ref.gate.wg.weight.grad, atol=1e-5)


@pytest.mark.smoke
@pytest.mark.world_size(2)
def test_expert_parallel_top2_with_capacity_matches_one_process():
    _check_parity(k=2, capacity_factor=0.75, min_capacity=1, use_rts=False, top2_2nd_expert_sampling=False)


@pytest.mark.world_size(2)
def test_expert_parallel_dropless_top1_matches_one_process():
    _check_parity(k=1, drop_tokens=False)


@pytest.mark.world_size(2)
def test_ep_size_larger_than_the_world_fails_clearly():
    with pytest.raises(ConfigError, match="ep_size 4 does not divide the world size 2"):
        MoE(D, _expert(), num_experts=4, ep_size=4)
