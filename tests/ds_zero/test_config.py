"""The zero_optimization section: DeepSpeed keys and defaults accepted, bad values rejected at parse
time (ConfigError naming the value and the fix), before any process group or buffer exists."""

import pytest

from ds_core.config import parse_config
from ds_core.errors import ConfigError
from ds_zero.config import ZeroConfig


def _zero(section):
    return parse_config({"train_batch_size": 2, "zero_optimization": section}).section("zero_optimization")


def test_deepspeed_defaults_and_stage_2_example():
    z = ZeroConfig()
    assert (z.stage, z.allgather_bucket_size, z.reduce_bucket_size) == (0, 500_000_000, 500_000_000)
    assert z.overlap_comm is False and z.reduce_scatter and z.contiguous_gradients and z.allgather_partitions
    assert z.load_from_fp32_weights and z.offload_optimizer.device == "none"
    z = _zero({"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
               "reduce_scatter": True, "reduce_bucket_size": "auto", "contiguous_gradients": True,
               "round_robin_gradients": True, "offload_optimizer": {"device": "cpu", "pin_memory": True},
               "sub_group_size": 1e9, "elastic_checkpoint": False, "stage3_prefetch_bucket_size": "auto",
               "stage3_gather_16bit_weights_on_model_save": True})
    assert z.allgather_bucket_size == 200_000_000 and z.reduce_bucket_size == 500_000_000
    assert z.offload and z.offload_optimizer.pin_memory
    assert _zero({"stage": 1, "cpu_offload": True}).offload  # DeepSpeed's deprecated spelling


@pytest.mark.parametrize("section, message", [
    ({"stage": 4}, "stage 4 is not a ZeRO stage"),
    ({"stage": -1}, "stage -1"),
    ({"stage": 2, "allgather_bucket_size": 0}, "allgather_bucket_size 0 must be > 0"),
    ({"stage": 2, "allgather_bucket_size": -5}, "allgather_bucket_size -5"),
    ({"stage": 2, "reduce_bucket_size": 1.5}, "whole number"),
    ({"stage": 2, "offload_optimizer": {"device": "gpu"}}, "offload device 'gpu'"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, "nvme_path '/local_nvme' does not exist"),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "needs stage 1 or 2"),
    ({"stage": 0, "offload_optimizer": {"device": "nvme", "nvme_path": "."}}, "'nvme' needs stage 1 or 2"),
    ({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "."}},
     r"offload_param.device 'nvme' needs offload_optimizer.device 'cpu' too \(or 'nvme'\)"),
    ({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": ".", "buffer_size": 0}},
     "offload_optimizer.buffer_size 0 must be > 0"),
    ({"stage": 3, "offload_param": {"device": "nvme", "buffer_size": 1.5}}, "buffer_size 1.5.*whole number"),
    ({"stage": 2, "reduce_bucket": 5}, "did you mean 'reduce_bucket_size'"),
])
def test_bad_input_is_a_config_error(section, message):
    with pytest.raises(ConfigError, match=message):
        _zero(section)


def test_bad_config_fails_before_any_state():
    import torch

    import ds_core

    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    with pytest.raises(ConfigError, match="stage 4"):
        ds_core.initialize(model=model, config={"train_batch_size": 2, "zero_optimization": {"stage": 4},
                                                "optimizer": {"type": "SGD", "params": {"lr": 1.0}}})
    assert torch.equal(model.weight, before)


def test_tagged_parameters_need_a_group_for_their_axis():
    """Tagged (expert) parameters are partitioned over their own axis; an axis without a group is an error."""
    import torch

    from ds_core.params import tag_params
    from ds_zero.partition import Partitions

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    tag_params(model[1].parameters(), reduce_axis="expert_data", shard_axis="expert")
    groups = [{"params": list(model.parameters())}]
    with pytest.raises(ConfigError, match=r"1\.weight is tagged with axis 'expert_data' but ZeRO was given no "
                                          r"process group for it"):
        Partitions(groups, model, None, torch.float32, torch.device("cpu"))
    parts = Partitions(groups, model, None, torch.float32, torch.device("cpu"),
                       axis_groups={"expert_data": None, "expert": None})
    assert [(g.axis, g.shard, g.source) for g in parts.groups] == [("data", None, 0), ("expert_data", "expert", 0)]
    assert parts.groups[1].names == ["1.bias", "1.weight"]


def test_nvme_offload_keys_and_deepspeed_defaults(tmp_path):
    z = ZeroConfig()
    assert (z.offload_optimizer.buffer_count, z.offload_optimizer.buffer_size) == (4, 100_000_000)
    assert (z.offload_param.buffer_count, z.offload_param.buffer_size, z.sub_group_size) == (5, 100_000_000,
                                                                                            1_000_000_000)
    z = _zero({"stage": 3, "sub_group_size": 1e6,
               "offload_optimizer": {"device": "NVMe", "nvme_path": str(tmp_path), "buffer_count": 3,
                                     "buffer_size": 1e7, "pin_memory": True},
               "offload_param": {"device": "nvme", "nvme_path": str(tmp_path), "buffer_size": 1e8}})
    assert z.offload and z.offload_optimizer.device == "nvme" and z.offload_optimizer.buffer_size == 10_000_000
    assert z.offload_param.device == "nvme" and z.offload_param.buffer_size == 100_000_000
    assert z.sub_group_size == 1_000_000
    assert _zero({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}).offload
    cpu_param = {"stage": 3, "offload_param": {"device": "cpu"},
                 "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}
    assert _zero(cpu_param).offload_param.device == "cpu"


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
@pytest.mark.parametrize("case", ["missing", "file", "read_only"])
def test_bad_nvme_path_fails_at_config_time_before_anything_is_created(tmp_path, monkeypatch, section, case):
    import os

    import torch

    import ds_core

    path = tmp_path / "nvme"
    if case == "file":
        path.write_text("not a directory")
    elif case == "read_only":
        path.mkdir()
        path.chmod(0o555)
        if os.geteuid() == 0:  # root may write anywhere: make os.access answer as for another user
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) else real(p, mode))
    rule = {"missing": "does not exist.*create it", "file": "is not a directory.*must name a directory",
            "read_only": "is not writable by this user.*permissions"}[case]
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu"}, section: {"device": "nvme", "nvme_path": str(path)}}
    with pytest.raises(ConfigError, match=f"{section}.nvme_path '{path}' {rule}"):
        _zero(zero)
    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    with pytest.raises(ConfigError, match=f"{section}.nvme_path"):
        ds_core.initialize(model=model, config={"train_batch_size": 2, "zero_optimization": zero,
                                                "optimizer": {"type": "SGD", "params": {"lr": 1.0}}})
    assert torch.equal(model.weight, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case == "missing" else ["nvme"])
    if path.is_dir():
        assert list(path.iterdir()) == []  # no ds_zero_swap directory, no file
