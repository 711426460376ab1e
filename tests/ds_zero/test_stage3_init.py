"""``ds_zero.Init`` with DeepSpeed's signature: ``remote_device="nvme"`` and ``config_dict_or_path``.

Reference: DDP on the same model built without ``Init`` from the same seed; fp32 losses to 1e-5.
"""

import copy
import json

import pytest
import torch

from ._train import CFG, config, ddp_losses, make_model, max_diff, train


@pytest.mark.world_size(2)
def test_init_on_nvme_from_a_config_file_trains_like_ddp(tmp_path_factory):
    import torch.distributed as dist

    import ds_core
    from ds_core.testing.models import GPT
    from ds_zero import Init

    ref = ddp_losses(copy.deepcopy(make_model()), 6)
    root = tmp_path_factory.mktemp(f"nvme{dist.get_rank()}")
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": str(root), "buffer_count": 3},
            "offload_optimizer": {"device": "cpu"}}
    path = root / "ds_config.json"
    path.write_text(json.dumps(config(zero_optimization=zero)))
    torch.manual_seed(0)
    with Init(remote_device="nvme", config_dict_or_path=str(path)):
        model = GPT(CFG)
    shards = [p.ds_shard for p in model.parameters()]
    assert all(s.swap is not None and not s.gathered for s in shards)
    # every shard is in its file; GPT's self.apply(init) read some back: at most buffer_count stay in memory
    assert sum(s._data is not None for s in shards) <= 3 < len(shards)
    assert list(root.glob("ds_zero_swap/rank*/init-param-*.swp"))
    engine = ds_core.initialize(model=model, config=str(path))[0]
    ours = train(engine, 6)
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    engine.optimizer.close()


def test_init_refuses_nvme_without_a_path_and_configs_below_stage_3(tmp_path):
    from ds_core.errors import ConfigError
    from ds_zero import Init

    with pytest.raises(ConfigError, match="needs config_dict_or_path with zero_optimization.offload_param.nvme_path"):
        Init(remote_device="nvme")
    with pytest.raises(ConfigError, match="zero_optimization.stage is 2; set it to 3"):
        Init(config_dict_or_path={"zero_optimization": {"stage": 2}})
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="does not exist"):
        Init(remote_device="nvme", config_dict_or_path=json.dumps(
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                   "offload_param": {"device": "nvme", "nvme_path": str(missing)}}}))
    with pytest.raises(ConfigError, match="remote_device 'disk' is not supported"):
        Init(remote_device="disk")
