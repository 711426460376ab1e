"""Accelerate for processes and data, ds for the model: the recipe in docs/integrations.md."""

import pytest

pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ds_core  # noqa: E402
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens  # noqa: E402


@pytest.mark.world_size(2)
def test_accelerate_shards_the_data_and_the_engine_trains():
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and accelerator.process_index == dist.get_rank()
    x, y = synthetic_tokens(16, 8, 32, step=0)
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=2))
    torch.manual_seed(0)
    engine, *_ = ds_core.initialize(
        model=GPT(GPTConfig(vocab_size=32, seq_len=8, dim=16, layers=1, heads=2)),
        config={"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                "zero_optimization": {"stage": 2}, "steps_per_print": 0})
    firsts = []
    for inputs, targets in loader:
        firsts.append(inputs[:, 0].clone())
        engine.backward(engine(inputs, targets))
        engine.step()
    assert engine.global_steps == 4  # 16 samples / (2 per rank x 2 ranks)
    seen = [torch.zeros(4, 2, dtype=torch.long) for _ in range(2)]
    dist.all_gather(seen, torch.stack(firsts))
    assert not torch.equal(seen[0], seen[1])  # each rank trained on its own share
    w = engine.module.head.weight.detach().clone()
    dist.broadcast(w, 0)
    assert torch.equal(w, engine.module.head.weight)  # and the ranks agree on the weights
