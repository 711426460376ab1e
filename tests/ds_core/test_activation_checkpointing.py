"""Activation checkpointing: exact gradient parity with dropout, fewer saved bytes, configure(),
the contiguous buffer, CPU offload, profiling, and activation partitioning on 2 real ranks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ds_core import checkpointing as ck
from ds_core.config import ActivationCheckpointingConfig, parse_config
from ds_core.errors import ConfigError
from ds_core.testing import run_distributed

WIDTH, LAYERS, BATCH = 32, 4, 8
ACT = BATCH * WIDTH * 4  # bytes of one block input (fp32)
# Checkpointed run: each block's input, plus the last output that the loss saves outside them.
CKPT_SAVED = (LAYERS + 1) * ACT


@pytest.fixture(autouse=True)
def _fresh_state():
    ck.reset(config=True)
    yield
    ck.reset(config=True)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Dropout(0.3),
                                         nn.Linear(4 * WIDTH, WIDTH)) for _ in range(LAYERS)])


def run_step(model: nn.Module, x: torch.Tensor, checkpointed: bool, seed: int = 1):
    """Forward (each block checkpointed or not) and backward; returns loss, grads, saved bytes."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:  # weights are not activations
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x
        for block in model:
            h = ck.checkpoint(block, h) if checkpointed else block(h)
        loss = h.square().mean()
    rng_after_forward = torch.get_rng_state()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    return loss.detach(), grads, sum(saved.values()), rng_after_forward


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# -- parity and memory -------------------------------------------------------------------------------

def test_gradients_equal_plain_run_exactly_with_dropout():
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    loss0, grads0, _, rng0 = run_step(model, x, checkpointed=False)
    loss1, grads1, _, rng1 = run_step(model, x, checkpointed=True)
    assert torch.equal(loss0, loss1)
    assert_same(grads0, grads1)
    assert torch.equal(rng0, rng1)  # the recompute does not disturb the RNG stream of the run


def test_dropout_masks_differ_between_seeds():
    # guards the parity test: dropout is really active, so equality above is not trivial
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, grads_a, _, _ = run_step(model, x, checkpointed=True, seed=1)
    _, grads_b, _, _ = run_step(model, x, checkpointed=True, seed=2)
    assert not torch.equal(grads_a[0], grads_b[0])


def test_saved_activation_bytes_are_lower():
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, _, plain, _ = run_step(model, x, checkpointed=False)
    _, _, ckpt, _ = run_step(model, x, checkpointed=True)
    assert ckpt == CKPT_SAVED
    assert plain > 5 * ckpt


def test_outputs_may_be_tuples_and_kwargs_pass_through():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    out, aux = ck.checkpoint(lambda a, scale: (lin(a) * scale, "aux"), x, scale=2.0)
    assert aux == "aux"
    out.sum().backward()
    assert x.grad is not None


# -- configure ---------------------------------------------------------------------------------------

def test_configure_from_full_config_dict_and_kwargs_override():
    assert not ck.is_configured()
    config = {"train_batch_size": 8, "activation_checkpointing": {
        "partition_activations": False, "cpu_checkpointing": True, "contiguous_memory_optimization": True,
        "number_checkpoints": 4, "synchronize_checkpoint_boundary": False, "profile": False}}
    ck.configure(None, deepspeed_config=config, profile=True)
    assert ck.is_configured()
    s = ck.settings()
    assert (s.cpu_checkpointing, s.contiguous_memory_optimization, s.number_checkpoints, s.profile) == (
        True, True, 4, True)
    ck.reset()  # frees buffers, keeps the configuration (DeepSpeed's reset)
    assert ck.is_configured() and ck.settings().number_checkpoints == 4
    ck.reset(config=True)
    assert not ck.is_configured() and ck.settings() == ActivationCheckpointingConfig()


@pytest.mark.parametrize("form", ["dsconfig", "section_dict", "section_model", "json_file"])
def test_configure_accepts_every_config_form(form, tmp_path):
    section = {"cpu_checkpointing": True, "number_checkpoints": 2}
    if form == "dsconfig":
        source = parse_config({"activation_checkpointing": section})
    elif form == "section_dict":
        source = section
    elif form == "section_model":
        source = ActivationCheckpointingConfig(**section)
    else:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"activation_checkpointing": section}))
        source = str(path)
    ck.configure(deepspeed_config=source)
    assert ck.settings().cpu_checkpointing and ck.settings().number_checkpoints == 2


def test_config_without_section_gives_defaults():
    ck.configure(deepspeed_config={"train_batch_size": 8})
    assert ck.settings() == ActivationCheckpointingConfig()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_checkpoints": 0}, "number_checkpoints=0 must be > 0"),
    ({"num_checkpoints": -3}, "number_checkpoints=-3 must be > 0"),
    ({"num_checkpoints": 2.5}, "num_checkpoints=2.5 must be an int"),
    ({"contiguous_checkpointing": True}, "number_checkpoints is not set"),
    ({"checkpoint_in_cpu": "yes"}, "checkpoint_in_cpu='yes' must be True or False"),
    ({"deepspeed_config": {"activation_checkpointing": {"number_checkpoints": 0}}}, "must be > 0"),
    ({"deepspeed_config": {"cpu_checkpointng": True}}, "did you mean 'cpu_checkpointing'"),
    ({"deepspeed_config": 42}, "is not a config"),
])
def test_bad_input_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ck.configure(**kwargs)
    assert not ck.is_configured()


def test_partition_without_group_warns_and_bad_mpu_errors():
    with pytest.warns(UserWarning, match="no tensor-parallel group"):
        ck.configure(partition_activations=True)
    with pytest.raises(ConfigError, match="gives no tensor-parallel group"):
        ck.configure(mpu_=object(), partition_activations=True)


def test_megatron_style_mpu_with_one_tensor_rank_is_a_noop():
    class Mpu:
        def get_model_parallel_world_size(self):
            return 1

        def get_model_parallel_rank(self):
            return 0

        def get_model_parallel_group(self):
            return None

    ck.configure(mpu_=Mpu(), partition_activations=True)
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, grads0, _, _ = run_step(model, x, checkpointed=False)
    _, grads1, saved, _ = run_step(model, x, checkpointed=True)
    assert_same(grads0, grads1)
    assert saved == CKPT_SAVED


def test_partition_with_tensor_size_one_is_a_noop():
    from ds_core.comm import Topology

    ck.configure(mpu_=Topology(1), partition_activations=True)
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, grads0, _, _ = run_step(model, x, checkpointed=False)
    _, grads1, saved, _ = run_step(model, x, checkpointed=True)
    assert_same(grads0, grads1)
    assert saved == CKPT_SAVED  # the plain inputs, unpartitioned


# -- cpu_checkpointing and the contiguous buffer -----------------------------------------------------

def test_cpu_checkpointing_on_a_cpu_run_saves_the_inputs_themselves():
    ck.configure(checkpoint_in_cpu=True)
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, grads0, _, _ = run_step(model, x, checkpointed=False)
    _, grads1, saved, _ = run_step(model, x, checkpointed=True)
    assert_same(grads0, grads1)
    assert saved == CKPT_SAVED  # no offload hook in between: no copies


@pytest.fixture
def device_run(monkeypatch):
    """Take the device-run path on this CPU machine (the code paths are device-agnostic)."""
    monkeypatch.setattr(ck, "_device_of", lambda args: torch.device("cpu"))


@pytest.mark.parametrize("offload", [False, True])
def test_contiguous_buffer_parity_and_slot_reuse(device_run, offload):
    ck.configure(contiguous_checkpointing=True, num_checkpoints=LAYERS, checkpoint_in_cpu=offload)
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, grads0, _, _ = run_step(model, x, checkpointed=False)
    for _ in range(3):  # the same slots serve every step
        _, grads1, saved, _ = run_step(model, x, checkpointed=True)
        assert_same(grads0, grads1)
        assert saved == ACT  # our hook took every block input; only the loss's own input remains
    (buffer,) = ck._state.buffers.values()
    assert buffer.bytes_allocated() == LAYERS * ACT
    assert all(len(pool.free) == LAYERS for pool in buffer._pools.values())


def test_contiguous_buffer_too_small_names_the_fix(device_run):
    ck.configure(contiguous_checkpointing=True, num_checkpoints=LAYERS - 1)
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    with pytest.raises(ConfigError, match=f"number_checkpoints={LAYERS - 1} is too small"):
        run_step(model, x, checkpointed=True)


def test_cpu_offload_device_path_parity(device_run):
    ck.configure(checkpoint_in_cpu=True)
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, grads0, _, _ = run_step(model, x, checkpointed=False)
    _, grads1, saved, _ = run_step(model, x, checkpointed=True)
    assert_same(grads0, grads1)
    assert saved == ACT  # save_on_cpu took every block input


# -- synchronize and profile -------------------------------------------------------------------------

class CountingAccelerator:
    device_type = "cpu"

    def __init__(self) -> None:
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1


def test_synchronize_and_profile(monkeypatch):
    import ds_core.accelerator

    acc = CountingAccelerator()
    monkeypatch.setattr(ds_core.accelerator, "get_accelerator", lambda: acc)
    ck.configure(synchronize=True, profile=True)
    model, x = make_model(), torch.randn(BATCH, WIDTH)
    _, grads0, _, _ = run_step(model, x, checkpointed=False)
    _, grads1, _, _ = run_step(model, x, checkpointed=True)
    assert_same(grads0, grads1)
    assert acc.syncs == 2 * LAYERS  # before each forward and each recompute
    timers = ck.get_timers()
    assert timers(ck.FORWARD_TIMER).count == LAYERS
    assert timers(ck.RECOMPUTE_TIMER).count == LAYERS
    assert timers.log([ck.FORWARD_TIMER, ck.RECOMPUTE_TIMER]).startswith("time (ms) | checkpoint_forward: ")


# -- partition_activations on 2 real ranks -----------------------------------------------------------

def _partitioned_rank():
    import torch.distributed as dist

    from ds_core import checkpointing
    from ds_core.comm import Topology

    checkpointing.configure(mpu_=Topology(dist.get_world_size(), tensor=2), partition_activations=True)
    kept = []
    original = checkpointing._InputStore.pack

    def pack(self, tensor):
        packed = original(self, tensor)
        if not isinstance(packed, torch.Tensor):
            kept.append(packed[-1].numel() * packed[-1].element_size())
        return packed

    checkpointing._InputStore.pack = pack
    model = make_model()  # same seed on both ranks: replicated weights and input, as in tensor parallelism
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(5))
    _, grads0, _, _ = run_step(model, x, checkpointed=False)
    _, grads1, _, _ = run_step(model, x, checkpointed=True)
    return all(torch.equal(a, b) for a, b in zip(grads0, grads1)), sum(kept)


def test_partition_activations_two_tensor_ranks():
    results = run_distributed(_partitioned_rank, 2, timeout=120)
    assert results == [(True, LAYERS * ACT // 2), (True, LAYERS * ACT // 2)]

