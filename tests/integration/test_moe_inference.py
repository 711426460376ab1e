"""ds-moe layers under ds_infer: experts spread over 2 ranks (all-to-all dispatch) generate the tokens of
the same model with every expert on one rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class MoENet(nn.Module):
    def __init__(self, ep_size: int) -> None:
        super().__init__()
        from ds_core.testing.models import MLP
        from ds_moe import MoE

        self.embed = nn.Embedding(64, 32)
        self.moe = MoE(32, MLP(32, 64), num_experts=4, ep_size=ep_size, k=2, drop_tokens=False, use_rts=False)
        self.head = nn.Linear(32, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.moe(h)[0])


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def whole():
    """Every expert in one process (built here, outside the ranks' topology): weights and tokens."""
    import ds_infer

    torch.manual_seed(0)
    model = MoENet(ep_size=1).eval()
    return model.state_dict(), ds_infer.init_inference(model).generate(_ids(), max_new_tokens=16)


@pytest.mark.world_size(2)
def test_ds_moe_experts_split_over_ranks_generate_the_same_tokens(whole):
    import ds_infer

    state, expect = whole
    split = MoENet(ep_size=2).eval()
    missing, _ = split.load_state_dict(state, strict=False)  # each rank keeps its two experts
    assert not missing and len(split.moe.experts.experts) == 2
    assert torch.equal(ds_infer.init_inference(split).generate(_ids(), max_new_tokens=16), expect)
