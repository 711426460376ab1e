"""The dataloader initialize() builds: sharded by data-parallel rank, micro-batch sized."""

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import ds_core
from ds_core.errors import ConfigError


@pytest.mark.world_size(2)
def test_loader_shards_by_rank():
    data = TensorDataset(torch.arange(32.0).unsqueeze(1), torch.zeros(32, 1))
    engine, _, loader, _ = ds_core.initialize(
        model=torch.nn.Linear(1, 1), training_data=data,
        config={"train_batch_size": 8, "gradient_accumulation_steps": 2, "seed": 3, "steps_per_print": 0,
                "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    assert engine.train_micro_batch_size_per_gpu() == 2
    seen = torch.cat([x for x, _ in loader]).flatten()
    assert len(loader) == 8 and seen.numel() == 16
    everyone = [None, None]
    dist.all_gather_object(everyone, sorted(seen.tolist()))
    assert sorted(everyone[0] + everyone[1]) == list(range(32))  # disjoint, complete


@pytest.mark.world_size(2)
def test_batch_triple_checked_against_world_before_group_use():
    with pytest.raises(ConfigError, match=r"train_batch_size 12 != 2 micro × 2 accumulation × 2 ranks = 8"):
        ds_core.initialize(model=torch.nn.Linear(1, 1), config={
            "train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})


def test_config_required():
    with pytest.raises(ConfigError, match="no config"):
        ds_core.initialize(model=torch.nn.Linear(1, 1))


def test_bad_config_touches_no_process_group():
    import subprocess
    import sys

    code = ("import torch, torch.distributed as dist, ds_core\n"
            "try:\n"
            "    ds_core.initialize(model=torch.nn.Linear(1, 1), config={'train_batch_sise': 8})\n"
            "except ds_core.ConfigError as e:\n"
            "    print('rejected:', e)\n"
            "print('initialized:', dist.is_initialized())\n")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert "did you mean 'train_batch_size'" in out.stdout, out.stderr
    assert "initialized: False" in out.stdout
