"""ZeRO stage 3 against plain PyTorch DDP on 4 gloo ranks (test_stage3.py covers 2).

The model has both hard cases of stage 3's gather schedule at once: an output head tied to the token
embedding (one parameter used by two modules) and a block called twice per forward (gathered,
released and gathered again, with its backward needing it twice). Sizes are odd on purpose, so most
parameters are padded before being split 4 ways. It is tiny because 4 ranks share 2 cores.

Tolerance: fp32 losses equal to DDP's to 1e-5 (absolute) at each of 20 steps (AdamW, clipping),
with and without CPU offload of the parameters and the optimizer.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_core
from ds_core.testing.models import synthetic_tokens

VOCAB, SEQ, DIM, MICRO, STEPS = 33, 8, 10, 3, 20
LR, CLIP, WD = 3e-3, 1.0, 0.01
TOLERANCE = 1e-5


class TiedTwiceLM(torch.nn.Module):
    """Embedding -> shared residual block (run twice) -> LayerNorm -> head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, DIM)  # 330 elements: padded to 332 at N = 4
        self.shared = torch.nn.Linear(DIM, DIM)
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x, y):
        h = self.tok(x)
        h = h + torch.tanh(self.shared(h))
        h = h + torch.tanh(self.shared(h))
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.view(-1, VOCAB), y.reshape(-1))


def _batch(step: int):
    return synthetic_tokens(MICRO, SEQ, VOCAB, step, dist.get_rank())


def _ddp_losses(model) -> list[float]:
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for step in range(STEPS):
        loss = ddp(*_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _stage3_losses(model, **zero) -> tuple[list[float], object]:
    engine, *_ = ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": CLIP, "steps_per_print": 0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
        # threshold 0: every parameter is partitioned, the LayerNorm and biases included
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero}})
    losses = []
    for step in range(STEPS):
        loss = engine(*_batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine


OFFLOAD = {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}


@pytest.mark.world_size(4)
@pytest.mark.parametrize("offload", [False, True], ids=["device", "cpu_offload"])
def test_stage3_matches_ddp_on_4_ranks_tied_and_called_twice(offload):
    torch.manual_seed(0)
    model = TiedTwiceLM()
    assert model.head.weight is model.tok.weight
    ref = _ddp_losses(copy.deepcopy(model))
    ours, engine = _stage3_losses(copy.deepcopy(model), overlap_comm=True, **(OFFLOAD if offload else {}))
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    assert diff < TOLERANCE, f"max |stage 3 - DDP| = {diff:.3g} >= {TOLERANCE} over {STEPS} steps: {ours} vs {ref}"
    assert ref[-1] < ref[0]  # it trained, so the comparison is not between two flat lines
    opt = engine.optimizer
    assert opt.offload == offload
    if offload:
        assert not opt.aliased and all(g.own().device.type == "cpu" for g in opt.parts.groups)
    # every shard released after the step, and each rank holds a quarter of the padded parameters
    for g in opt.parts.groups:
        assert g.partition_numel * 4 == g.padded
        for s in g.sharded:
            assert not s.gathered and s.users == 0 and not s.held_for_backward, s.name
    tied = [s for g in opt.parts.groups for s in g.sharded if s.param is engine.module.tok.weight]
    assert len(tied) == 1  # the tied weight is one shard, not two
