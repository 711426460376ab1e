"""Bad input fails with a clear error on every rank, without hanging."""

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ds_core
from ds_core.testing import run_distributed

from . import _gpt


def _bad_inputs():
    from ds_pipe import LayerSpec, PipelineModule

    out = {}
    topo = ds_core.comm.Topology(dist.get_world_size(), pipe=2)
    for name, kwargs in [("stages", dict(layers=[LayerSpec(nn.Linear, 4, 4)])),
                         ("regex", dict(layers=[LayerSpec(nn.Linear, 4, 4)] * 2, partition_method="type:Conv"))]:
        try:
            PipelineModule(topology=topo, **kwargs)
        except Exception as exc:  # noqa: BLE001
            out[name] = str(exc)

    def engine(layers):
        model = PipelineModule(layers, topology=topo, loss_fn=nn.functional.mse_loss, partition_method="uniform")
        return ds_core.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  config=_gpt.config())[0]

    x, y = torch.ones(2, 4), torch.zeros(2, 4)
    eng = engine([LayerSpec(nn.Linear, 4, 4), LayerSpec(nn.Linear, 4, 4)])
    try:  # 3 items for a 4-micro-batch batch
        eng.train_batch(iter([(x, y)] * 3))
    except Exception as exc:  # noqa: BLE001
        out["exhausted"] = str(exc)
    out["after"] = float(eng.train_batch(itertools.repeat((x, y))))  # the engine still works
    try:  # micro-batch 2 has another shape
        eng.train_batch(iter([(x, y), (x, y), (torch.ones(3, 4), torch.zeros(3, 4)), (x, y)]))
    except Exception as exc:  # noqa: BLE001
        out["changed"] = str(exc)
    eng = engine([LayerSpec(nn.Linear, 4, 8), LayerSpec(nn.Linear, 4, 4)])  # stage 1 expects 4, gets 8
    try:
        eng.train_batch(itertools.repeat((x, y)))
    except Exception as exc:  # noqa: BLE001
        out["mismatch"] = str(exc)
    return out


def test_bad_inputs_fail_on_every_rank():
    results = run_distributed(_bad_inputs, 2, timeout=60)
    for out in results:
        assert "2 pipeline stages but only 1 layers" in out["stages"]
        assert "'type:Conv' matches no layer" in out["regex"] and "Linear" in out["regex"]
        assert "rank 0 (stage 0" in out["exhausted"] and "ran out at micro-batch 3 of 4" in out["exhausted"]
        assert out["after"] > 0
        assert "micro-batch 2" in out["changed"] and "(3, 4)" in out["changed"]
        assert "rank 1 (stage 1" in out["mismatch"] and "shapes [(2, 8)]" in out["mismatch"]
    assert "stopped because of it" in results[0]["mismatch"]  # rank 0 did not fail itself


def test_forward_points_to_train_batch():
    from ds_pipe import PipelineEngine

    with pytest.raises(Exception, match="train_batch"):
        PipelineEngine._only_batches(None)
