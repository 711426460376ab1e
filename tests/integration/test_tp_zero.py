"""Tensor parallelism composed with ZeRO stages 1 and 2 over the data axis (tensor 2 × data 2 on 4
ranks), against the unsharded model on one process (losses and global gradient norms to 1e-5); their
checkpoints reload exactly and consolidate
with ``ds zero-to-fp32`` into the unsharded model's state dict. ZeRO stage 3 with tensor
parallelism is refused with a clear error on every rank."""

import pytest
import torch
from safetensors.torch import load_file

from ds_core.errors import ConfigError
from ds_core.testing.harness import run_distributed
from tests.ds_parallel._train import batch, build, engine_losses, loss_of, reference_losses

KIND, STEPS = "llama_kv3", 8
IDS = torch.arange(16).remainder(7).view(2, 8)


def _config(stage):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5, "steps_per_print": 0,
            "tensor_parallel": {"autotp_size": 2}, "zero_optimization": {"stage": stage}}


def _steps(engine, first, last, dp_rank):
    losses = []
    for step in range(first, last):
        tokens, targets = batch(step)
        tokens, targets = tokens[dp_rank * 2:(dp_rank + 1) * 2], targets[dp_rank * 2:(dp_rank + 1) * 2]
        loss = loss_of(KIND, engine, tokens, targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _run(root):
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    for stage in (1, 2):
        norms = []
        losses, engine = engine_losses(KIND, _config(stage), steps=STEPS, dp_rank=rank // 2, dp=2, norms=norms)
        engine.save_checkpoint(f"{root}/zero{stage}", tag="saved")
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=IDS).logits
        engine.train()
        continued = _steps(engine, STEPS, STEPS + 2, rank // 2)
        _, fresh = engine_losses(KIND, _config(stage), steps=0, dp_rank=rank // 2, dp=2)
        fresh.load_checkpoint(f"{root}/zero{stage}", tag="saved")
        resumed = _steps(fresh, STEPS, STEPS + 2, rank // 2)
        out[stage] = {"losses": losses, "norms": norms, "continued": continued, "resumed": resumed,
                      "logits": logits}
    ref_norms = []
    out["reference"] = reference_losses(KIND, STEPS, norms=ref_norms) if rank == 0 else None
    out["reference_norms"] = ref_norms
    return out


@pytest.fixture(scope="module")
def tp2_dp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_zero")
    return root, run_distributed(_run, 4, args=(str(root),), timeout=900)


@pytest.mark.parametrize("stage", [1, 2])
def test_tp2_dp2_zero_matches_unsharded(tp2_dp2, stage):
    _, ranks = tp2_dp2
    ref = ranks[0]["reference"]
    for step in range(STEPS):
        got = (ranks[0][stage]["losses"][step] + ranks[2][stage]["losses"][step]) / 2  # data ranks 0 and 1
        assert abs(got - ref[step]) < 1e-5, (stage, step, got, ref[step])
        for rank in ranks:  # ZeRO's global norm adds each tensor shard's partitions once
            want = ranks[0]["reference_norms"][step]
            assert abs(rank[stage]["norms"][step] - want) <= 1e-5 * want, (stage, step, rank[stage]["norms"], want)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_tp_checkpoint_reloads_exactly(tp2_dp2, stage):
    for rank in tp2_dp2[1]:
        assert rank[stage]["resumed"] == rank[stage]["continued"]


def _reload_at_data_size_1(root):
    out = {}
    for stage in (1, 2):
        _, engine = engine_losses(KIND, _config(stage), steps=0, dp_rank=0, dp=1)
        engine.load_checkpoint(f"{root}/zero{stage}", tag="saved")  # optimizer state re-sliced per tensor rank
        engine.eval()
        with torch.no_grad():
            out[stage] = engine(input_ids=IDS).logits
    return out


def test_zero_tp_checkpoint_reloads_at_another_data_parallel_size(tp2_dp2):
    """Saved at tensor 2 × data 2, loaded at tensor 2 × data 1 (each tensor rank's ZeRO partitions,
    optimizer state included, re-sliced over its new data ranks): the same model."""
    root, ranks = tp2_dp2
    for rank in run_distributed(_reload_at_data_size_1, 2, args=(str(root),), timeout=600):
        for stage in (1, 2):
            torch.testing.assert_close(rank[stage], ranks[0][stage]["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_to_fp32_consolidates_tensor_shards(tp2_dp2, stage, tmp_path):
    from ds_core.cli import main

    root, ranks = tp2_dp2
    out = tmp_path / "full.safetensors"
    assert main(["zero-to-fp32", f"{root}/zero{stage}", str(out)]) == 0
    model = build(KIND, seed=7)
    model.load_state_dict(load_file(str(out)), strict=True)  # plain names, full shapes
    with torch.no_grad():
        logits = model.eval()(input_ids=IDS).logits
    torch.testing.assert_close(logits, ranks[0][stage]["logits"], rtol=1e-5, atol=1e-5)


def _stage3():
    try:
        engine_losses("gpt", {**_config(3), "train_micro_batch_size_per_gpu": 4}, steps=0)
    except ConfigError as exc:
        import torch.distributed as dist

        dist.barrier()  # every rank got here: nobody is left waiting in a collective
        return str(exc)
    return None


def test_zero3_with_tensor_parallel_is_refused_on_every_rank():
    messages = run_distributed(_stage3, 2)  # every rank returns (none hangs in a collective)
    assert all(m and m.startswith("ZeRO stage 3 with tensor parallelism is not supported") for m in messages)
