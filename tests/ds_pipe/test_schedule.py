"""Schedules and partitioning as data: no processes."""

import pytest

from ds_core.errors import ConfigError
from ds_pipe import schedule as S
from ds_pipe.partition import balanced_boundaries, layer_weights


def test_1f1b_order_matches_pipedream_flush():
    # Narayanan et al. 2021, fig. 3: 4 stages, 8 micro-batches; stage s warms up with p - s - 1 forwards.
    order = S.TrainSchedule(8, 4, 0).order()
    assert order[:4] == [("F", 0), ("F", 1), ("F", 2), ("F", 3)]
    assert order[4:8] == [("B", 0), ("F", 4), ("B", 1), ("F", 5)]
    assert S.TrainSchedule(8, 4, 3).order()[:4] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    for s in range(4):
        order = S.TrainSchedule(8, 4, s).order()
        assert sorted(order) == sorted([("F", i) for i in range(8)] + [("B", i) for i in range(8)])
        in_flight = peak = 0
        for kind, _ in order:
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == 4 - s  # at most p - s activations held


def test_instruction_stream_of_a_middle_stage():
    steps = list(S.TrainSchedule(2, 3, 1).steps())
    assert steps[0] == [S.RecvActivation(0), S.ForwardPass(0), S.SendActivation(0)]
    assert steps[2] == [S.RecvGrad(0), S.BackwardPass(0), S.SendGrad(0)]
    assert steps[-1] == [S.ReduceTiedGrads(), S.ReduceGrads(), S.OptimizerStep()]
    first = S.TrainSchedule(2, 2, 0).instructions()
    assert first[0] == S.LoadMicroBatch(0) and S.RecvActivation(0) not in first
    last = S.TrainSchedule(2, 2, 1).instructions()
    assert last[:3] == [S.RecvActivation(0), S.LoadMicroBatch(0), S.ForwardPass(0)]
    assert all(type(c) is not S.BackwardPass for c in S.InferenceSchedule(3, 2, 1).instructions())


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8), (4, 16), (8, 3)])
def test_bubble_equals_theory(p, m):
    for cls in (S.TrainSchedule, S.GPipeSchedule):
        makespan, bubble = S.simulate(cls, p, m, forward=1.0, backward=2.0)
        assert makespan == pytest.approx((m + p - 1) * 3.0)
        assert bubble == pytest.approx(S.theoretical_bubble(p, m))


def test_partition_methods():
    assert balanced_boundaries([1] * 7, 2) == [0, 4, 7] or balanced_boundaries([1] * 7, 2) == [0, 3, 7]
    assert balanced_boundaries([10, 1, 1, 1, 10], 2) == [0, 2, 5]
    names = ["Embedding", "Block", "Block", "Block", "Block", "LayerNorm", "Linear"]
    w = layer_weights("type:block", names, [0] * 7)
    assert w == [0, 1, 1, 1, 1, 0, 0]
    parts = balanced_boundaries(w, 2)
    assert sum(w[parts[0]:parts[1]]) == sum(w[parts[1]:parts[2]]) == 2
    with pytest.raises(ConfigError, match="matches no layer.*Block"):
        layer_weights("type:Transformer", names, [0] * 7)
    with pytest.raises(ConfigError, match="3 pipeline stages but only 2 layers"):
        balanced_boundaries([1, 1], 3)
    with pytest.raises(ConfigError, match="not known"):
        layer_weights("best-effort", names, [0] * 7)
