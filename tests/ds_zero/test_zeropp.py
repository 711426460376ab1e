"""ZeRO++ qwZ and qgZ on 2 gloo ranks: the tiny GPT against plain stage 3, bytes on the wire, checkpoints.

Every parameter is partitioned (persistence threshold 0), so every module gather goes through the
quantized path. Tolerances: the loss after 12 AdamW steps within 1e-2 of plain stage 3 for qwZ (int8
weights, blocks of 256: at most half a step of 1/127 of a block's largest value per weight) and 5e-2
for qgZ (int4 gradients, blocks of 128: the coarser code, but one rounding per rank and unbiased
enough at this scale); both trains (the loss falls). Gathered weights are compared bit for bit with
the block quantization of the exact shards.
"""

import copy

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core import comm
from ds_zero.fingerprint import ModulePathMismatchError, header_len
from ds_zero.quantize import WEIGHT_BLOCK, dequantize_rows, quantize_rows, row_bytes

from ._train import batch, config, make_model, train

STEPS = 12
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
QWZ_TOLERANCE, QGZ_TOLERANCE = 1e-2, 5e-2


def _engine(model, **zero):
    return ds_core.initialize(model=model, config=config(zero_optimization=dict(ZERO3, **zero),
                                                         comms_logger={"enabled": True}))[0]


def _run(model, steps=STEPS, **zero):
    """Losses, the bytes of each collective kind per step and the all-gathers as {message bytes: count}
    (the comms logger, reset after the setup)."""
    engine = _engine(model, **zero)
    comm.comms_logger.reset()
    losses = train(engine, steps)
    totals = {op: t["bytes"] / steps for op, t in comm.comms_logger.totals().items()}
    gathers = {size: stat.count for (op, size), stat in comm.comms_logger.stats.items() if op == "all_gather"}
    comm.comms_logger.reset()
    return losses, totals, engine, gathers


def _plain():
    losses, totals, _, gathers = _run(make_model())
    return losses, totals, gathers


@pytest.fixture(scope="module")
def plain():
    """Plain stage 3 on 2 ranks, once for the module: each rank's losses and bytes per step."""
    from ds_core.testing.harness import run_distributed

    return run_distributed(_plain, 2)


@pytest.mark.world_size(2)
def test_qwz_trains_like_plain_stage3_with_a_quarter_of_the_gather_bytes(plain):
    ref, ref_bytes, ref_gathers = plain[dist.get_rank()]
    ours, our_bytes, _, gathers = _run(make_model(), zero_quantized_weights=True)
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    assert diff < QWZ_TOLERANCE, (ours, ref)
    assert ours != ref  # the gathers really were quantized
    assert ours[-1] < ours[0], ours
    ratio = our_bytes["all_gather"] / ref_bytes["all_gather"]
    # int8 codes + one fp32 scale per 256 values is 0.254 of fp32; the rest is each gather's 56-byte
    # header and small parameters rounded up to one block
    assert ratio < 0.36, ratio
    # each gather exactly: plain sends (header + P fp32 values) per rank; qwZ the same header and
    # row_bytes(P) = the int8 codes of whole 256-value blocks and one fp32 scale per block. Header-only
    # exchanges (the module-path digest, guards before unrecorded gathers) are the same in both.
    world, head = dist.get_world_size(), header_len(torch.float32) * 4
    expected = {}
    for size, count in ref_gathers.items():
        values = (size // world - head) // 4
        wire = world * (head + row_bytes(values, WEIGHT_BLOCK)) if values else size
        expected[wire] = expected.get(wire, 0) + count
    assert gathers == expected, (gathers, expected)
    assert our_bytes.get("reduce_scatter", 0) == ref_bytes.get("reduce_scatter", 0)
    assert our_bytes.get("all_reduce", 0) == ref_bytes.get("all_reduce", 0)  # gradients untouched


@pytest.mark.world_size(2)
def test_qwz_gathered_weight_is_the_dequantized_shards_bit_for_bit():
    engine = _engine(make_model(), zero_quantized_weights=True)
    train(engine, 3)
    linear = engine.module.blocks[0].qkv
    seen = {}
    handle = linear.register_forward_hook(
        lambda m, a, o: seen.update(w=m.weight.detach().clone(), b=None if m.bias is None else m.bias.detach().clone()))
    x, y = batch(4, 99)
    engine(x, y)
    handle.remove()
    items = [p.ds_shard for p in linear.parameters(recurse=False)]
    world = dist.get_world_size()
    # every rank's exact shards, laid end to end as the gather sends them
    exact = [torch.cat([s.shard for s in items])]
    rows = [torch.empty_like(exact[0]) for _ in range(world)]
    dist.all_gather(rows, exact[0])
    payload = torch.stack(rows)
    ref = dequantize_rows(quantize_rows(payload, WEIGHT_BLOCK), payload.shape[1], WEIGHT_BLOCK)
    off = 0
    for s, got in zip(items, (seen["w"], seen["b"])):
        want = ref[:, off:off + s.part].reshape(-1)[:s.numel].view(s.shape)
        off += s.part
        assert torch.equal(got, want), s.name
        exact_full = payload[:, off - s.part:off].reshape(-1)[:s.numel].view(s.shape)
        assert not torch.equal(got, exact_full)  # quantized, not exact
    engine.backward(engine(x, y))  # leave no step half-done


@pytest.mark.world_size(2)
def test_qwz_checkpoint_resume_equals_the_uninterrupted_run(tmp_path):
    model = make_model()
    straight = _engine(copy.deepcopy(model), zero_quantized_weights=True)
    full = train(straight, 6)
    first = _engine(copy.deepcopy(model), zero_quantized_weights=True)
    train(first, 4)
    first.save_checkpoint(tmp_path)
    second = _engine(make_model(seed=7), zero_quantized_weights=True)  # a fresh model, other weights
    second.load_checkpoint(tmp_path)
    rest = train(second, 2, first_step=4)
    assert rest == full[4:], (rest, full[4:])


@pytest.mark.world_size(2)
def test_qgz_trains_like_plain_stage3_with_at_most_a_quarter_of_the_gradient_bytes(plain):
    ref, ref_bytes, _ = plain[dist.get_rank()]
    ours, our_bytes, _, _ = _run(make_model(), zero_quantized_gradients=True)
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    assert diff < QGZ_TOLERANCE, (ours, ref)
    assert ours[-1] < ours[0], ours
    # plain stage 3 reduces each gradient in fp32 (gloo: an all-reduce of the padded gradient, the same
    # bytes a reduce-scatter's input has); qgZ sends int4 codes + a fp32 scale per 128 values
    fp32 = ref_bytes.get("reduce_scatter", 0) + ref_bytes.get("all_reduce", 0)
    assert our_bytes["all_to_all"] <= fp32 / 4, (our_bytes, ref_bytes)
    assert our_bytes["all_gather"] == ref_bytes["all_gather"]  # weights untouched


@pytest.mark.world_size(2, timeout=90)
def test_qwz_rank_leaving_the_recorded_order_fails_naming_the_modules():
    """The notice a deviating rank sends in place of the next logged gather is shaped like a quantized
    gather (bytes), so its peers receive it instead of hanging (test_stage3_hang.py's case, with qwZ)."""
    from .test_stage3_hang import _swap, _train_until_failure
    from .test_stage3_prefetch import Branchy, branchy_engine

    engine = branchy_engine(Branchy(), stage3_prefetch_bucket_size=300, zero_quantized_weights=True)
    with pytest.raises(ModulePathMismatchError, match="ranks are running different modules") as info:
        _train_until_failure(engine, 6, 3, _swap)
    text = str(info.value)
    assert "'b2 (forward)'" in text and "'b1 (forward)' was recorded" in text, text
    assert engine.strategy.coordinator.prefetcher.stats["notices"] >= (1 if dist.get_rank() == 1 else 0)


@pytest.mark.world_size(2)
def test_qwz_and_qgz_together_in_bf16_train_like_plain_bf16_stage3():
    """Both on, bf16 model weights (dequantized into bf16; gradients quantized from bf16): within qgZ's
    tolerance of plain bf16 stage 3 at each of 6 steps."""
    def losses(**zero):
        engine = ds_core.initialize(model=make_model(), config=config(
            zero_optimization=dict(ZERO3, **zero), bf16={"enabled": True}))[0]
        return train(engine, 6)

    ref = losses()
    ours = losses(zero_quantized_weights=True, zero_quantized_gradients=True)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < QGZ_TOLERANCE, (ours, ref)
    assert ours != ref
