"""Every collective of a training step goes through ``ds_core.comm``, so the comms logger sees it.

``torch.distributed``'s collectives are wrapped to record who called them; a step (and a checkpoint)
at stage 0, ZeRO 1, 2 and 3, and through a two-stage pipeline with tied weights must call them only
from ``ds_core.comm`` (or from inside torch itself: building a DeviceMesh); the comms logger counts
the operations."""

import sys

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens
from tests.ds_pipe import _gpt

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_to_all_single", "send", "recv", "isend", "irecv", "barrier", "reduce", "scatter", "gather",
               "all_gather_object", "broadcast_object_list", "batch_isend_irecv")
CFG = GPTConfig(vocab_size=32, seq_len=8, dim=16, layers=2, heads=2)


def _spy():
    direct: set[str] = set()
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def wrapper(*args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            if not (caller.startswith("ds_core.comm") or caller.startswith("torch.")):
                direct.add(f"{_name} from {caller}")
            return _real(*args, **kwargs)

        setattr(dist, name, wrapper)
    return direct


def _engine_steps(path):
    direct = _spy()
    comms = ds_core.comm.comms_logger
    seen = {}
    for zero in (None, {"stage": 1}, {"stage": 2}, {"stage": 3, "stage3_param_persistence_threshold": 0}):
        torch.manual_seed(0)
        config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0, "gradient_clipping": 1.0,
                  "fp16": {"enabled": True, "initial_scale_power": 4}, "comms_logger": {"enabled": True},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
        if zero:
            config["zero_optimization"] = zero
            config.pop("fp16")
            config["bf16"] = {"enabled": True}
        comms.reset()
        engine = ds_core.initialize(model=GPT(CFG), config=config)[0]
        for step in range(2):
            engine.backward(engine(*synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, step, dist.get_rank())))
            engine.step()
        engine.save_checkpoint(path, tag=f"z{zero and zero['stage']}")
        engine.load_checkpoint(path, tag=f"z{zero and zero['stage']}")
        seen[zero and zero["stage"]] = sorted(comms.totals())
    return sorted(direct), seen


def _pipeline_steps(path):
    from ds_pipe import PipelineModule

    direct = _spy()
    comms = ds_core.comm.comms_logger
    topo = ds_core.comm.Topology(dist.get_world_size(), pipe=2)
    model = PipelineModule(_gpt.specs(True), topology=topo, loss_fn=_gpt.loss_fn, seed_layers=True)
    config = _gpt.config(zero_optimization={"stage": 1}, gradient_clipping=1.0, comms_logger={"enabled": True},
                         optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    engine = ds_core.initialize(model=model, config=config)[0]
    comms.reset()
    data = topo.coordinates(dist.get_rank())["data"]
    for step in range(2):
        engine.train_batch(_gpt.data_iter(1, data, start=step))
    engine.save_checkpoint(path, tag="pipe")
    engine.load_checkpoint(path, tag="pipe")
    return sorted(direct), sorted(comms.totals())


@pytest.mark.parametrize("world", [2])
def test_engine_and_zero_collectives_go_through_ds_core_comm(tmp_path, world):
    for direct, seen in run_distributed(_engine_steps, world, args=(str(tmp_path),), timeout=300):
        assert direct == []
        assert "all_reduce" in seen[None] and "broadcast" in seen[None]
        assert "all_gather" in seen[3] or "all_reduce" in seen[3]


def test_pipeline_collectives_go_through_ds_core_comm(tmp_path):
    for direct, seen in run_distributed(_pipeline_steps, 4, args=(str(tmp_path),), timeout=300):
        assert direct == []
        assert {"send", "recv", "all_reduce"} <= set(seen)
