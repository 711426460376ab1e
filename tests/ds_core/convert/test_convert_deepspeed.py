"""Converting DeepSpeed checkpoint directories without DeepSpeed installed.

The files are written here in DeepSpeed's layout (``torch.save`` of plain tensors and dicts, plus small
stand-in classes registered under DeepSpeed's module paths while saving, so the pickles name exactly
what DeepSpeed's do): a plain PyTorch run (AdamW, 6 steps) plays the DeepSpeed run on 2 ranks. The
converted checkpoint resumes in ds on 1 rank (a world size other than the saving one) and continues
exactly like the plain run continuing (tolerance 1e-6: the same fp32 arithmetic, summed in another
order).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict

import pytest
import torch

import ds_core
from ds_core.convert import UnsafeCheckpointError, convert_deepspeed, load_restricted, read_deepspeed
from ds_core.engine.checkpoint import CheckpointError

WORLD = 2
LR, WD = 0.01, 0.01


# -- stand-ins for DeepSpeed's classes, pickled under DeepSpeed's module paths ---------------------------

@contextlib.contextmanager
def deepspeed_modules():
    """Register fake ``deepspeed.*`` modules holding stand-in classes while files are saved (removed after,
    so nothing else sees a 'deepspeed' module)."""
    names = ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler",
             "deepspeed.runtime.zero", "deepspeed.runtime.zero.config", "deepspeed.utils",
             "deepspeed.utils.tensor_fragment"]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}

    class LossScaler:
        def __init__(self, scale):
            self.cur_scale, self.dynamic = scale, False

    class DynamicLossScaler:
        def __init__(self, scale, cur_iter, last_overflow_iter, hysteresis):
            self.cur_scale, self.cur_iter, self.last_overflow_iter = scale, cur_iter, last_overflow_iter
            self.cur_hysteresis, self.scale_factor, self.scale_window, self.dynamic = hysteresis, 2.0, 1000, True

    class ZeroStageEnum(int):
        def __reduce__(self):
            return (type(self), (int(self),))

    class fragment_address:  # noqa: N801 (DeepSpeed's name)
        def __init__(self, numel, start):
            self.numel, self.start = numel, start

    for cls, mod in ((LossScaler, "deepspeed.runtime.fp16.loss_scaler"),
                     (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler"), (ZeroStageEnum, "deepspeed.runtime.zero.config"),
                     (fragment_address, "deepspeed.utils.tensor_fragment")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    sys.modules.update(mods)
    try:
        yield types.SimpleNamespace(LossScaler=LossScaler, DynamicLossScaler=DynamicLossScaler,
                                    ZeroStageEnum=ZeroStageEnum, fragment_address=fragment_address)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


# -- the reference run ---------------------------------------------------------------------------------

def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _reference():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    data = _batches(10)
    _train(model, opt, data[:6])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    after = _train(model, opt, data[6:])
    return state, moments, hyper, data[6:], after


def _config(stage):
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _write_deepspeed(tmp_path, stage, state, moments, hyper, extra=None, config=None, scaler=None):
    """The files DeepSpeed 0.19 writes for this run at ``stage`` on ``WORLD`` ranks."""
    names = [k for k in state if k.endswith(("weight", "bias"))]
    shapes = OrderedDict((n, torch.Size(state[n].shape)) for n in names)
    tag = tmp_path / "ds_ckpt" / "global_step6"
    tag.mkdir(parents=True)
    (tmp_path / "ds_ckpt" / "latest").write_text("global_step6")
    common = {"buffer_names": [], "optimizer": None, "param_shapes": [shapes], "frozen_param_shapes": OrderedDict(),
              "shared_params": {}, "frozen_param_fragments": OrderedDict(), "lr_scheduler": None,
              "data_sampler": None, "random_ltd": None, "skipped_steps": 0, "global_steps": 6, "global_samples": 96,
              "dp_world_size": WORLD, "mp_world_size": 1, "ds_config": config or _config(stage), "ds_version": "0.19.8",
              "epoch": 2, "cursor": torch.tensor([4, 5]), **(extra or {})}
    group_hyper = {**hyper, "params": [0]}
    with deepspeed_modules() as ds:
        if stage in (1, 2):
            torch.save({**common, "module": OrderedDict(state)}, tag / "mp_rank_00_model_states.pt")
            numel = sum(state[n].numel() for n in names)
            padded = math.ceil(numel / (2 * WORLD)) * 2 * WORLD
            part = padded // WORLD

            def split(flat):
                flat = torch.cat([flat, torch.zeros(padded - numel)])
                return [flat[r * part:(r + 1) * part].clone() for r in range(WORLD)]

            masters = split(_flat(state[n] for n in names))
            avg = split(_flat(moments[n]["exp_avg"] for n in names))
            sq = split(_flat(moments[n]["exp_avg_sq"] for n in names))
            step = moments[names[0]]["step"]
            for r in range(WORLD):
                optim = {"loss_scaler": scaler(ds) if scaler else ds.LossScaler(1.0), "dynamic_loss_scale": False,
                         "overflow": False,
                         "clip_grad": 0.0,
                         "base_optimizer_state": {"state": {0: {"step": step.clone(), "exp_avg": avg[r],
                                                                "exp_avg_sq": sq[r]}},
                                                  "param_groups": [group_hyper]},
                         "single_partition_of_fp32_groups": [masters[r]], "zero_stage": ds.ZeroStageEnum(stage),
                         "group_paddings": [padded - numel if r == WORLD - 1 else 0], "partition_count": [WORLD],
                         "ds_version": "0.19.8",
                         "param_slice_mappings": [OrderedDict({names[0]: ds.fragment_address(part, 0)})]}
                torch.save({"optimizer_state_dict": optim, "ds_config": _config(stage), "ds_version": "0.19.8"},
                           tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        else:  # stage 3: every parameter in ceil(numel / world) pieces
            def pieces(tensors, r):
                out = []
                for t in tensors:
                    p = math.ceil(t.numel() / WORLD)
                    flat = torch.cat([t.reshape(-1), torch.zeros(p * WORLD - t.numel())])
                    out.append(flat[r * p:(r + 1) * p])
                return torch.cat(out)

            placeholders = OrderedDict((k, torch.empty(0)) for k in state)
            for r in range(WORLD):
                torch.save({**common, "module": placeholders}, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
                inner = {"state": {0: {"exp_avg": pieces([moments[n]["exp_avg"] for n in names], r),
                                       "exp_avg_sq": pieces([moments[n]["exp_avg_sq"] for n in names], r),
                                       "step": moments[names[0]]["step"].clone()}},
                         "param_groups": [group_hyper]}
                optim = {"zero_stage": ds.ZeroStageEnum(3), "loss_scaler": ds.LossScaler(1.0),
                         "dynamic_loss_scale": False, "overflow": False, "partition_count": WORLD,
                         "optimizer_state_dict": inner, "fp32_flat_groups": [pieces([state[n] for n in names], r)]}
                torch.save({"optimizer_state_dict": optim, "ds_config": _config(3), "ds_version": "0.19.8"},
                           tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return tmp_path / "ds_ckpt"


# -- tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_converted_checkpoint_resumes_like_the_run_continuing(tmp_path, stage):
    state, moments, hyper, rest, after = _reference()
    src = _write_deepspeed(tmp_path, stage, state, moments, hyper)
    out = convert_deepspeed(src, tmp_path / "ds")
    assert out == tmp_path / "ds" / "global_step6" and (tmp_path / "ds" / "latest").read_text() == "global_step6"
    model = _model(seed=1)  # other weights: everything comes from the checkpoint
    engine, *_ = ds_core.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR,
                                                                             weight_decay=WD),
                                    config=_config(stage))
    with pytest.warns(UserWarning, match="saved by 2"):
        _, client = engine.load_checkpoint(tmp_path / "ds")
    assert client["epoch"] == 2 and torch.equal(client["cursor"], torch.tensor([4, 5]))
    assert engine.global_steps == 6 and engine.global_samples == 96
    losses = []
    for x, y in rest:
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(after), rtol=1e-6, atol=1e-6)


def test_reading_reassembles_masters_and_moments(tmp_path):
    state, moments, hyper, *_ = _reference()
    for stage in (2, 3):
        src = _write_deepspeed(tmp_path / f"s{stage}", stage, state, moments, hyper)
        read = read_deepspeed(src)
        assert read.stage == stage and read.world_size == WORLD and read.precision == "fp32"
        (group,) = read.groups
        assert group.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
        for name, piece, avg in zip(group.names, group.pieces(group.master), group.pieces(group.state["exp_avg"])):
            assert torch.equal(piece.reshape(state[name].shape), state[name])
            assert torch.equal(avg.reshape(state[name].shape), moments[name]["exp_avg"])
        assert group.hyper["lr"] == LR and read.client_state["epoch"] == 2


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.smoke
def test_a_planted_malicious_pickle_is_refused_without_running(tmp_path):
    state, moments, hyper, *_ = _reference()
    marker = tmp_path / "pwned"
    src = _write_deepspeed(tmp_path, 2, state, moments, hyper, extra={"payload": _Exploit(marker)})
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        convert_deepspeed(src, tmp_path / "ds")
    assert not marker.exists()
    assert not (tmp_path / "ds" / "global_step6").exists()


def test_a_class_outside_the_allowlist_is_named(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"x": torch.ones(2), "odd": pickle.PickleError("x")}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"_pickle\.PickleError|pickle\.PickleError"):
        load_restricted(path)


def test_missing_rank_file_and_non_checkpoint_are_refused(tmp_path):
    state, moments, hyper, *_ = _reference()
    src = _write_deepspeed(tmp_path, 2, state, moments, hyper)
    (src / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"):
        read_deepspeed(src)
    with pytest.raises(CheckpointError, match="no 'latest'"):
        read_deepspeed(tmp_path)


def test_cli_converts(tmp_path):
    state, moments, hyper, *_ = _reference()
    src = _write_deepspeed(tmp_path, 2, state, moments, hyper)
    done = subprocess.run([sys.executable, "-m", "ds_core", "convert-deepspeed", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "global_step6" / "zero_rank1.safetensors").is_file()
    assert "global_step6" in done.stdout


def test_fp16_loss_scale_state_is_carried_over(tmp_path):
    state, moments, hyper, *_ = _reference()
    config = {**_config(2), "fp16": {"enabled": True, "initial_scale_power": 16}}
    src = _write_deepspeed(tmp_path, 2, state, moments, hyper, config=config,
                           scaler=lambda ds: ds.DynamicLossScaler(1024.0, 50, 40, 2))
    read = read_deepspeed(src)
    assert read.precision == "fp16"
    expected = {"scale": 1024.0, "remaining_hysteresis": 2, "iteration": 50, "last_overflow": 40}
    assert read.loss_scaler == expected
    out = convert_deepspeed(src, tmp_path / "ds")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["loss_scaler"] == expected and meta["precision"] == "fp16"
    assert meta["converted_from"]["framework"] == "deepspeed"
