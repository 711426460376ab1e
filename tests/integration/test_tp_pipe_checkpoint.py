"""Pipeline × tensor-parallel checkpoints under other sizes: 2 stages × tensor 2 train on 4 ranks and save
(per-layer files per tensor rank) the model of ``test_tp_pipe.py`` whose transformer block is tied across
both stages and tensor-sharded; then

- ``ds zero-to-fp32`` writes the unsharded state dict (names ``{layer index}.{name in the layer}``, the
  PipelineModule's and an ``nn.Sequential`` of the same layers' names), equal exactly to the trained
  shards stitched by hand, which an unpipelined, unsharded ``nn.Sequential`` loads strictly;
- ``ds_parallel.load_tp_checkpoint`` loads it into the unsharded model, into 2 stages × tensor 1 on
  2 ranks, and into tensor 2 without the pipeline on 2 ranks: exact weights, and the next step's loss
  equal (1e-5) to the same checkpoint reloaded at the saved sizes;
- ``engine.load_checkpoint`` at tensor 1 refuses it, naming both sizes and the two ways to load it.
"""

import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ds_core.testing.harness import run_distributed
from tests.integration.test_tp_pipe import CFG, LR, _engine, _loss, _specs

TRAIN_STEPS = 2


def _batches(offset: int):
    from ds_core.testing.models import synthetic_tokens

    for i in range(2):
        yield synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, offset + i)


def _layers_state(module) -> dict[str, torch.Tensor]:
    """This stage's layers' tensors, named ``{global index}.{key}`` (shard keys kept); the tied block
    under each index it has on this stage."""
    layers = dict(module.local_layers)
    for key, tied in module.tied_modules.items():
        layers.update({i: tied for i in module.tied_indices[key] if module.stage_of(i) == module.stage_id})
    return {f"{idx}.{k}": v.detach().clone() for idx, layer in layers.items() for k, v in layer.state_dict().items()}


def _train_and_save(root: str):
    """4 ranks: pipe 2 × tensor 2 trains and saves; a fresh engine at the same sizes reloads it and
    takes one more step (the reference loss)."""
    engine = _engine(True)
    from tests.integration.test_tp_pipe import _data

    it = _data()
    for _ in range(TRAIN_STEPS):
        engine.train_batch(it)
    engine.save_checkpoint(root, tag="saved")
    trained = _layers_state(engine.module)
    fresh = _engine(True, seed=99)
    fresh.load_checkpoint(root, tag="saved", load_optimizer_states=False)
    reloaded = _layers_state(fresh.module)
    next_loss = float(fresh.train_batch(_batches(500)))
    return trained, reloaded, next_loss


def _load_at_tp1(root: str, resaved: str):
    """2 ranks: pipe 2 × tensor 1. ``engine.load_checkpoint`` refuses; ``load_tp_checkpoint`` loads."""
    import torch.distributed as dist

    import ds_core
    from ds_core.errors import DSError
    from ds_parallel import load_tp_checkpoint
    from ds_pipe import PipelineModule

    def build():
        topology = ds_core.comm.Topology(dist.get_world_size(), pipe=2, tensor=1)
        model = PipelineModule(_specs(True), topology=topology, loss_fn=_loss, seed_layers=True, base_seed=7,
                               partition_method="uniform")
        engine, *_ = ds_core.initialize(model=model, optimizer=lambda g: torch.optim.AdamW(g, lr=LR), config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 0})
        return engine

    engine = build()
    try:
        engine.load_checkpoint(root, tag="saved")
        refused = None
    except DSError as exc:
        refused = str(exc)
    engine = build()
    load_tp_checkpoint(engine.module, root)
    pipe_result = (refused, _layers_state(engine.module), float(engine.train_batch(_batches(500))))
    engine.save_checkpoint(resaved, tag="t1")  # a pipeline checkpoint without tensor parallelism
    pipe_result += (_layers_state(engine.module),)

    # the same ranks as tensor 2 without the pipeline: an nn.Sequential of the layers, sharded by initialize
    torch.manual_seed(7)
    flat, *_ = ds_core.initialize(model=_sequential(), optimizer=lambda g: torch.optim.AdamW(g, lr=LR), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 0,
        "tensor_parallel": {"autotp_size": 2}})
    load_tp_checkpoint(flat.module, root)
    state = {k: v.detach().clone() for k, v in flat.module.state_dict().items()}
    with torch.no_grad():
        flat_loss = sum(_loss(flat.module(x), y).item() for x, y in _batches(500)) / 2
    return pipe_result, (state, flat_loss)


_SHARD = re.compile(r"^(.+)#(?:tp:\d+/\d+|rep):dim(\d+):([\dx]+):([\d+,]+)$")


def _by_hand(states) -> dict[str, torch.Tensor]:
    """Every rank's tensors stitched into full ones, independently of the code under test."""
    full: dict[str, torch.Tensor] = {}
    for state in states:
        for key, value in state.items():
            m = _SHARD.match(key)
            if m is None:
                if key in full:
                    assert torch.equal(full[key], value), key  # replicated over the tensor ranks
                full[key] = value
                continue
            name, dim = m[1], int(m[2])
            out = full.setdefault(name, torch.full([int(d) for d in m[3].split("x")], float("nan")))
            at = 0
            for run in m[4].split(","):
                start, length = (int(v) for v in run.split("+"))
                out.narrow(dim, start, length).copy_(value.narrow(dim, at, length))
                at += length
    for name, t in full.items():
        assert not t.isnan().any(), f"{name}: rows no rank held"
    return full


def _sequential() -> nn.Sequential:
    """The layers unpipelined: the tied block is one module at both its indices."""
    layers, ties = [], {}
    for spec in _specs(True):
        key = getattr(spec, "key", None)
        layers.append(ties[key] if key in ties else spec.build())
        if key is not None:
            ties.setdefault(key, layers[-1])
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe2_tp2")
    results = run_distributed(_train_and_save, 4, args=(str(root),), timeout=600)
    trained = _by_hand([r[0] for r in results])
    assert any("#tp:" in k for r in results for k in r[0])  # the blocks were tensor-sharded
    for r in results:  # the same-size reload is exact (the reference below is that reload)
        assert r[0].keys() == r[1].keys() and all(torch.equal(r[0][k], r[1][k]) for k in r[0])
    next_loss = results[-1][2]  # the last stage's loss
    return root, trained, next_loss


def _sequential_loss(model: nn.Sequential) -> float:
    with torch.no_grad():
        return sum(_loss(model(x), y).item() for x, y in _batches(500)) / 2


def test_zero_to_fp32_consolidates_pipe2_tp2(saved, tmp_path):
    from ds_zero.cli import main

    root, trained, next_loss = saved
    out = tmp_path / "full.safetensors"
    assert main([str(root), str(out)]) == 0  # `ds zero-to-fp32 save_dir out.safetensors`
    state = load_file(str(out))
    assert state.keys() == trained.keys()
    for name, value in trained.items():
        assert state[name].shape == value.shape and torch.equal(state[name], value), name
    model = _sequential()
    model.load_state_dict(state, strict=True)  # the unpipelined, unsharded model
    assert abs(_sequential_loss(model) - next_loss) < 1e-5


def test_load_tp_checkpoint_unsharded_unpipelined(saved):
    from ds_parallel import load_tp_checkpoint

    root, trained, next_loss = saved
    model = load_tp_checkpoint(_sequential(), root)
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert abs(_sequential_loss(model) - next_loss) < 1e-5


def test_pipe2_tp2_checkpoint_loads_at_pipe2_tp1_and_tp2(saved, tmp_path):
    from ds_zero import zero_to_fp32

    root, trained, next_loss = saved
    both = run_distributed(_load_at_tp1, 2, args=(str(root), str(tmp_path / "tp1")), timeout=600)
    flat = [r[1] for r in both]  # tensor 2 without the pipeline: exact weights, the same loss
    assert all(any("#tp:" in k for k in state) for state, _ in flat)
    stitched = _by_hand([state for state, _ in flat])
    assert stitched.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(stitched[name], value), name
    for _, loss in flat:
        assert abs(loss - next_loss) < 1e-5
    results = [r[0] for r in both]  # pipe 2 x tensor 1
    for refused, state, *_ in results:
        assert refused is not None and "autotp_size" in refused and "2" in refused and "1" in refused, refused
        assert "load_tp_checkpoint" in refused and "zero-to-fp32" in refused, refused
        for name, value in state.items():
            assert torch.equal(value, trained[name]), name
    assert {k for r in results for k in r[1]} == trained.keys()
    assert abs(results[-1][2] - next_loss) < 1e-5
    # the pipe 2 × tensor 1 run saved after its step: a plain pipeline checkpoint consolidates too
    after = _by_hand([r[3] for r in results])
    zero_to_fp32(tmp_path / "tp1", tmp_path / "tp1.safetensors")
    state = load_file(str(tmp_path / "tp1.safetensors"))
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in after)
