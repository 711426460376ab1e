"""ZeRO++ hpZ on 4 gloo ranks with secondary groups of 2: backward gathers stay in the group.

Reference: plain stage 3 on the same seed and data. hpZ changes which ranks a backward gather talks
to, not the values it delivers (the secondary shards are cut from the forward's gathered tensors and
gathered exactly), so the losses are equal bit for bit. The comms logger's records are counted by the
size of the group each all-gather ran on (4: every data-parallel rank, 2: a secondary group).
"""

import pytest
import torch.distributed as dist

import ds_core
from ds_core import comm
from ds_core.errors import ConfigError
from ds_zero.fingerprint import header_len, name_of

from ._train import batch, config, make_model

STEPS = 4
# reuse distance 0: every parameter is released after each use, so every backward gathers again (with
# the default, parameters stay gathered from forward to backward once the order is recorded)
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}


def _train_counting(engine, steps: int):
    """Losses, and the parameter all-gathers of forward and of backward as {group size: count}."""
    counts = {"forward": {}, "backward": {}}
    phase = ["forward"]
    add = comm.comms_logger.add
    head = header_len(next(engine.module.parameters()).dtype) * 4  # bytes of one rank's header (fp32)

    def record(op, nbytes, seconds, world):
        # the header-only exchanges (module-path digest, guards) are not parameter gathers
        if op == "all_gather" and nbytes > world * head:
            counts[phase[0]][world] = counts[phase[0]].get(world, 0) + 1
        add(op, nbytes, seconds, world)

    comm.comms_logger.add = record
    losses = []
    try:
        for step in range(steps):
            phase[0] = "forward"
            loss = engine(*batch(4, step))
            phase[0] = "backward"
            engine.backward(loss)
            phase[0] = "step"
            engine.step()
            losses.append(loss.item())
    finally:
        comm.comms_logger.add = add
    return losses, counts


def _forms(pf) -> list[tuple[str, int]]:
    """The recorded step's gathers: the fetch point each was issued for (a module's forward, or the first
    use of a parameter in backward) and its form (0: all ranks, 1: all ranks quantized, 2: the hpZ group)."""
    return [(name_of(target), form)
            for (_, target, _), form in zip(pf.plans[(True, True)], pf.plan_forms[(True, True)], strict=True)]


def _engine(**zero):
    return ds_core.initialize(model=make_model(), config=config(zero_optimization=dict(ZERO3, **zero),
                                                                comms_logger={"enabled": True}))[0]


@pytest.mark.world_size(4)
def test_hpz_backward_gathers_stay_in_the_secondary_group_and_losses_match_plain_stage3():
    ref, ref_counts = _train_counting(_engine(), STEPS)
    engine = _engine(zero_hpz_partition_size=2)
    ours, counts = _train_counting(engine, STEPS)
    assert ours == ref, (ours, ref)
    assert set(ref_counts["backward"]) == {4}  # plain stage 3 re-gathers over all 4 ranks
    assert set(counts["backward"]) == {2}, counts  # hpZ: only within the pair
    assert counts["backward"][2] == ref_counts["backward"][4]  # the same gathers, on the smaller group
    # the gathers for backward that the prefetcher starts while forward still runs are the pair's too: in
    # the recorded step every gather for a backward fetch point ran on the pair, and every forward one on
    # all 4 but the head's, whose weight is the token embedding's (tied), gathered a second time
    pf = engine.strategy.coordinator.prefetcher
    forms = _forms(pf)
    assert {f for name, f in forms if name.endswith("(backward)")} == {2}, forms
    assert [(name, f) for name, f in forms if name.endswith("(forward)") and f != 0] == [("head (forward)", 2)]
    # the same gathers in all: plain stage 3's on all 4 ranks, hpZ's split between all 4 and the pairs
    assert sum(c for phase in counts.values() for c in phase.values()) == \
        sum(c for phase in ref_counts.values() for c in phase.values())
    assert sum(phase.get(2, 0) for phase in counts.values()) > sum(phase.get(4, 0) for phase in counts.values()) / 2
    assert pf.stats["secondary"] > 0
    assert all(s.secondary is None for s in pf.shards)  # dropped once backward ended
    # the pair of consecutive ranks: ranks 0-1 and 2-3
    assert [dist.get_global_rank(pf.hpz.group, r) for r in range(2)] == [dist.get_rank() // 2 * 2,
                                                                          dist.get_rank() // 2 * 2 + 1]


@pytest.mark.world_size(4)
def test_hpz_partition_size_not_dividing_the_world_fails_on_every_rank():
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size 3 does not divide the data-parallel "
                                          r"world size 4.*divisor of 4"):
        _engine(zero_hpz_partition_size=3)


def test_zeropp_keys_need_stage_3():
    from ds_core.config import parse_config

    for key, value in (("zero_quantized_weights", True), ("zero_quantized_gradients", True),
                       ("zero_hpz_partition_size", 2)):
        with pytest.raises(Exception, match=f"{key} .* needs stage 3"):
            parse_config({"train_batch_size": 2, "zero_optimization": {"stage": 2, key: value}})


@pytest.mark.world_size(4)
def test_hpz_with_qwz_matches_qwz_alone_and_keeps_secondary_gathers_exact():
    """With qwZ the forward's gathered weights are dequantized; the secondary shards are cut from them and
    gathered exactly, so backward sees the forward's weights — the same ones a qwZ backward re-gather
    rebuilds from the same shards. Hence hpZ + qwZ equals qwZ alone bit for bit."""
    ref, _ = _train_counting(_engine(zero_quantized_weights=True), STEPS)
    engine = _engine(zero_quantized_weights=True, zero_hpz_partition_size=2)
    ours, counts = _train_counting(engine, STEPS)
    assert ours == ref, (ours, ref)
    assert set(counts["backward"]) == {2}, counts
    forms = _forms(engine.strategy.coordinator.prefetcher)
    assert {f for name, f in forms if name.endswith("(backward)")} == {2}, forms
    assert {f for name, f in forms if name.endswith("(forward)") and name != "head (forward)"} == {1}, forms


QGZ_TOLERANCE = 5e-2  # int4 gradients (test_zeropp.py); the hierarchical form rounds the node sums once more


def _all_to_all_bytes_by_group(engine, steps):
    """Losses, and the all-to-all bytes per step keyed by the global ranks of the group they ran on."""
    sent: dict[tuple, int] = {}
    original = comm.all_to_all

    def counting(output, input, *args, group=None, **kwargs):
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(4))
        sent[ranks] = sent.get(ranks, 0) + input.numel() * input.element_size()
        return original(output, input, *args, group=group, **kwargs)

    comm.all_to_all = counting
    try:
        losses, _ = _train_counting(engine, steps)
    finally:
        comm.all_to_all = original
    return losses, {k: v / steps for k, v in sent.items()}


@pytest.mark.world_size(4)
def test_hierarchical_qgz_sends_half_the_flat_bytes_across_nodes():
    """qgZ with hpZ's pairs as nodes (ranks 0-1, 2-3): within the node every chunk goes out as in the
    flat all-to-all; across nodes (ranks 0-2, 1-3) only each node's partial sums of 2 chunks: 1/2."""
    ref, _ = _train_counting(_engine(), STEPS)
    flat_losses, flat = _all_to_all_bytes_by_group(_engine(zero_quantized_gradients=True), STEPS)
    ours, sent = _all_to_all_bytes_by_group(_engine(zero_quantized_gradients=True, zero_hpz_partition_size=2),
                                            STEPS)
    rank = dist.get_rank()
    node = (rank // 2 * 2, rank // 2 * 2 + 1)
    across = (rank % 2, rank % 2 + 2)
    assert set(flat) == {(0, 1, 2, 3)} and set(sent) == {node, across}, (flat, sent)
    assert sent[node] == flat[(0, 1, 2, 3)]
    assert sent[across] * 2 == flat[(0, 1, 2, 3)]
    for losses in (flat_losses, ours):
        diff = max(abs(a - b) for a, b in zip(losses, ref))
        assert diff < QGZ_TOLERANCE, (losses, ref)

