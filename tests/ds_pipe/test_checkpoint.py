"""Per-layer checkpoints: resume on the same layout, reload into 1 and 4 stages."""

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.testing import run_distributed

from . import _gpt


def _engine(pipe: int):
    from ds_pipe import PipelineModule

    topo = ds_core.comm.Topology(dist.get_world_size(), pipe=pipe)
    model = PipelineModule(_gpt.specs(True), topology=topo, loss_fn=_gpt.loss_fn, seed_layers=True,
                           base_seed=99 if pipe != 2 else 1234)  # other layouts start from other weights
    opt = torch.optim.AdamW(model.parameters(), lr=_gpt.LR)
    return ds_core.initialize(model=model, optimizer=opt, config=_gpt.config())[0], topo


def _eval(engine, topo):
    return float(engine.eval_batch(_gpt.data_iter(1, 0, start=50)))  # same data on every replica


def _save_and_resume(path):
    engine, topo = _engine(2)
    data = topo.coordinates(dist.get_rank())["data"]
    for step in range(2):
        engine.train_batch(_gpt.data_iter(1, data, start=step))
    engine.save_checkpoint(path, client_state={"step": 2})
    before = _eval(engine, topo)
    cont = [float(engine.train_batch(_gpt.data_iter(1, data, start=s))) for s in (2, 3)]
    resumed, topo = _engine(2)
    _, client = resumed.load_checkpoint(path)
    again = [float(resumed.train_batch(_gpt.data_iter(1, data, start=s))) for s in (2, 3)]
    return before, cont, again, client["step"]


def _reload(path, pipe):
    engine, topo = _engine(pipe)
    engine.load_checkpoint(path, load_optimizer_states=False)
    return _eval(engine, topo)


def test_save_resume_and_repartition(tmp_path):
    out = run_distributed(_save_and_resume, 2, args=(str(tmp_path),), timeout=120)
    before, cont, again, step = out[0]
    assert again == pytest.approx(cont, abs=1e-6) and step == 2
    assert sorted(p.name for p in (tmp_path / "global_step2").glob("layer_*"))[0] == "layer_00-model_states.safetensors"
    one = run_distributed(_reload, 2, args=(str(tmp_path), 1), timeout=120)  # 1 stage × 2 data
    four = run_distributed(_reload, 4, args=(str(tmp_path), 4), timeout=150)  # 4 stages
    assert one[0] == pytest.approx(before, abs=1e-5)
    assert four[0] == pytest.approx(before, abs=1e-5)
