"""The engine API that Hugging Face (Trainer, Accelerate) and Lightning call on DeepSpeed's engine."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import ds_core
from ds_core.engine.checkpoint import CheckpointError
from ds_core.errors import CommError
from ds_core.testing.faults import run_python
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=32, seq_len=8, dim=16, layers=1, heads=2)


def _config(**over):
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 0,
            "seed": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    base.update(over)
    return base


def _engine(model=None, **over):
    torch.manual_seed(0)
    engine, *_ = ds_core.initialize(model=model if model is not None else GPT(CFG), config=_config(**over))
    return engine


def _steps(engine, n, start=0):
    rank = dist.get_rank()
    for step in range(start, start + n):
        x, y = synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, step, rank)
        engine.backward(engine(x, y))
        engine.step()


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.world_size(2, mode="thread")  # threads over an in-process group: fast logic tests
def test_config_reads_as_a_dict():
    engine = _engine(zero_optimization={"stage": 2, "reduce_bucket_size": 1000})
    assert engine.config["zero_optimization"]["stage"] == 2
    assert engine.config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert engine.config.get("zero_optimization")["overlap_comm"] in (True, False)  # a default in effect
    assert engine.config["train_batch_size"] == 4  # resolved: 2 micro x 1 accumulation x 2 ranks
    assert engine.config.get("no_such_section", "absent") == "absent"
    assert "optimizer" in engine.config and "fp16" not in engine.config
    with pytest.raises(KeyError):
        engine.config["no_such_section"]


@pytest.mark.world_size(2, mode="thread")
def test_set_gradient_accumulation_boundary_overrides_the_count():
    engine = _engine(gradient_accumulation_steps=4)
    before = _weights(engine.module)
    engine.set_gradient_accumulation_boundary(True)  # the framework says: this micro-step ends the batch
    assert engine.is_gradient_accumulation_boundary()
    _steps(engine, 1)
    assert engine.global_steps == 1
    assert not torch.equal(before["head.weight"], engine.module.head.weight)
    engine.set_gradient_accumulation_boundary(False)  # ... and these do not, whatever the count says
    _steps(engine, 4, start=1)
    assert engine.global_steps == 1
    # both ranks stepped with the same averaged gradient: weights agree
    w = engine.module.head.weight.detach().clone()
    dist.broadcast(w, 0)
    assert torch.equal(w, engine.module.head.weight)
    engine.set_gradient_accumulation_boundary(None)  # back to counting micro-steps
    assert engine.is_gradient_accumulation_boundary() == ((engine.micro_steps + 1) % 4 == 0)


@pytest.mark.world_size(2, mode="thread")
def test_save_checkpoint_can_exclude_frozen_parameters(tmp_path):
    model = GPT(CFG)
    model.pos.weight.requires_grad_(False)
    engine = _engine(model)
    _steps(engine, 1)
    engine.save_checkpoint(tmp_path, tag="lean", exclude_frozen_parameters=True)
    engine.save_checkpoint(tmp_path, tag="full")
    assert "pos.weight" not in load_file(tmp_path / "lean" / "model.safetensors")
    assert "pos.weight" in load_file(tmp_path / "full" / "model.safetensors")
    assert "ln_f.weight" in load_file(tmp_path / "lean" / "model.safetensors")

    torch.manual_seed(5)
    fresh_model = GPT(CFG)
    fresh_model.pos.weight.requires_grad_(False)
    fresh = _engine(fresh_model)
    own_frozen = fresh.module.pos.weight.detach().clone()
    fresh.load_checkpoint(tmp_path, tag="lean")  # the frozen tensor is not "missing"
    assert torch.equal(fresh.module.head.weight, engine.module.head.weight)
    assert torch.equal(fresh.module.pos.weight, own_frozen)  # the model keeps its own frozen values


class Grown(GPT):
    """The GPT with one more parameter: a checkpoint of the plain GPT lacks it."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.extra = torch.nn.Parameter(torch.zeros(3))


@pytest.mark.world_size(2, mode="thread")
def test_load_module_strict_false_allows_missing_and_unexpected_tensors(tmp_path):
    engine = _engine()
    _steps(engine, 1)
    engine.save_checkpoint(tmp_path)
    grown = _engine(Grown(CFG))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\): extra"):
        grown.load_checkpoint(tmp_path)
    grown.load_checkpoint(tmp_path, load_module_strict=False, load_optimizer_states=False)
    assert torch.equal(grown.module.head.weight, engine.module.head.weight)
    assert torch.equal(grown.module.extra, torch.zeros(3))
    # a shape mismatch stays an error, strict or not
    wider = _engine(GPT(GPTConfig(vocab_size=32, seq_len=8, dim=24, layers=1, heads=2)))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        wider.load_checkpoint(tmp_path, load_module_strict=False, load_optimizer_states=False)


@pytest.mark.world_size(2, mode="thread")
def test_load_module_only_takes_the_weights_and_nothing_else(tmp_path):
    engine = _engine(scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 10}})
    _steps(engine, 3)
    engine.save_checkpoint(tmp_path)
    fresh = _engine(scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 10}})
    lr_before = fresh.get_lr()
    fresh.load_checkpoint(tmp_path, load_module_only=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.module.state_dict().values(),
                                                 engine.module.state_dict().values()))
    assert fresh.global_steps == 0 and fresh.get_lr() == lr_before
    assert len(fresh.optimizer.state) == 0  # no optimizer state was loaded


@pytest.mark.world_size(2, mode="thread")
def test_zero3_consolidated_16bit_state_dict_gathers_on_rank_0():
    model = GPT(CFG)
    reference = {k: v.to(torch.bfloat16) for k, v in _weights(model).items()}
    engine = _engine(model, bf16={"enabled": True},
                     zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0,
                                        "stage3_gather_16bit_weights_on_model_save": True})
    assert engine.zero_gather_16bit_weights_on_model_save() is True
    state = engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank calls it
    if dist.get_rank() == 0:
        assert set(state) == set(reference)
        for key, value in reference.items():
            assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], value), key
    else:
        assert state is None
    # frozen parameters can be left out; outside stage 3 the module's own state is returned
    plain = _engine(zero_optimization={"stage": 2})
    assert plain.zero_gather_16bit_weights_on_model_save() is False
    state = plain._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        assert torch.equal(state["head.weight"], plain.module.head.weight)


@pytest.mark.world_size(2, mode="thread")
def test_optimizer_wrapper_exposes_state_param_groups_and_overflow():
    _check_optimizer_wrapper(stage=0)


@pytest.mark.world_size(2)  # ZeRO's reduce needs a real gloo group
def test_zero_optimizer_wrapper_exposes_state_param_groups_and_overflow():
    _check_optimizer_wrapper(stage=2)


def _check_optimizer_wrapper(stage):
    engine = _engine(zero_optimization={"stage": stage})
    opt = engine.optimizer
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups is opt.optimizer.param_groups
    assert opt.overflow is False and len(opt.state) == 0
    _steps(engine, 1)
    assert opt.overflow is False
    states = list(opt.state.values())
    assert states and {"exp_avg", "exp_avg_sq", "step"} <= set(states[0])


@pytest.mark.world_size(2, mode="thread")
def test_optimizer_overflow_reports_a_skipped_fp16_step():
    engine = _engine(fp16={"enabled": True, "initial_scale_power": 4})
    x, y = synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, 0, dist.get_rank())
    loss = engine(x, y)
    engine.backward(loss * float("inf") if dist.get_rank() == 1 else loss)  # overflow on one rank only
    engine.step()
    assert engine.optimizer.overflow is True and engine.skipped_steps == 1  # on both ranks
    _steps(engine, 1, start=1)
    assert engine.optimizer.overflow is False


@pytest.mark.world_size(2, mode="thread")
def test_client_state_holds_nested_tensors(tmp_path):
    engine = _engine()
    _steps(engine, 1)
    client = {  # the shape of Lightning's checkpoint: callback states hold tensors deep inside
        "epoch": 3,
        "callbacks": {"ModelCheckpoint{'monitor': 'loss'}": {
            "best_model_score": torch.tensor(0.25), "best_k_models": {"a.ckpt": torch.tensor(0.5)},
            "best_model_path": "a.ckpt"}},
        "loops": {"fit_loop": {"state_dict": {}, "progress": [1, 2, torch.arange(3)]}},
        "cursor": torch.tensor([7, 8]),
    }
    engine.save_checkpoint(tmp_path, client_state=client)
    fresh = _engine()
    _, loaded = fresh.load_checkpoint(tmp_path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["cursor"], torch.tensor([7, 8]))
    cb = loaded["callbacks"]["ModelCheckpoint{'monitor': 'loss'}"]
    assert torch.equal(cb["best_model_score"], torch.tensor(0.25)) and cb["best_model_path"] == "a.ckpt"
    assert torch.equal(cb["best_k_models"]["a.ckpt"], torch.tensor(0.5))
    assert loaded["loops"]["fit_loop"]["progress"][:2] == [1, 2]
    assert torch.equal(loaded["loops"]["fit_loop"]["progress"][2], torch.arange(3))
    meta = json.loads((tmp_path / "global_step1" / "meta.json").read_text())
    assert meta["client_state"]["epoch"] == 3  # JSON stays readable


class Opaque:
    pass


@pytest.mark.world_size(2, mode="thread")
def test_client_state_error_names_the_key_path(tmp_path):
    engine = _engine()
    bad = {"callbacks": {"EarlyStopping": {"patience": 3, "hook": Opaque()}}}
    with pytest.raises(CheckpointError, match=r"client_state\['callbacks'\]\['EarlyStopping'\]\['hook'\] is a "
                                              r".*test_framework_api.Opaque"):
        engine.save_checkpoint(tmp_path, client_state=bad)  # raised on every rank: nothing hangs
    assert not (tmp_path / "latest").exists()
    engine.save_checkpoint(tmp_path, client_state={"ok": [1, {"deep": torch.ones(1)}]})  # still usable


def test_current_device_name():
    assert ds_core.get_accelerator().current_device_name() == "cpu"


def test_init_distributed_takes_deepspeeds_arguments():
    # one fresh interpreter: auto_mpi_discovery=False refuses MPI variables, then a one-process world
    # starts with the backend, port and timeout given
    code = ("import datetime, os, ds_core, torch.distributed as d\n"
            "os.environ.update(OMPI_COMM_WORLD_RANK='0', OMPI_COMM_WORLD_SIZE='2')\n"
            "try:\n"
            "    ds_core.init_distributed('gloo', auto_mpi_discovery=False)\n"
            "except ds_core.errors.CommError as e:\n"
            "    print('REFUSED', e)\n"
            "del os.environ['OMPI_COMM_WORLD_RANK'], os.environ['OMPI_COMM_WORLD_SIZE']\n"
            "ds_core.init_distributed('gloo', auto_mpi_discovery=True, distributed_port=29500, "
            "timeout=datetime.timedelta(seconds=60))\n"
            "print('WORLD', d.get_world_size(), d.get_backend())\n")
    out = run_python(code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and "auto_mpi_discovery=True" in out.stdout, out.stdout + out.stderr
    assert "WORLD 1 gloo" in out.stdout
    assert issubclass(CommError, RuntimeError)


@pytest.mark.serial  # picks a TCP port in advance
def test_init_distributed_discovers_mpi_ranks_on_the_given_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import ds_core, torch, torch.distributed as d\n"
            f"ds_core.init_distributed('gloo', distributed_port={port}, timeout=120)\n"
            "t = torch.ones(1) * (d.get_rank() + 1); d.all_reduce(t)\n"
            "import os; print(d.get_rank(), d.get_world_size(), int(t.item()), os.environ['MASTER_PORT'])\n"
            "d.destroy_process_group()\n")
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**base, "OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2",
                                              "OMPI_COMM_WORLD_LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert sorted(o.split()[-4:][0] for o, _ in outs) == ["0", "1"]
    assert all(o.split()[-3:] == ["2", "3", str(port)] for o, _ in outs)
