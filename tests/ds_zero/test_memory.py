"""Measured per-rank bytes against the formulas of ds_zero.memory (the ZeRO paper's, with fp32 gradients).

Optimizer state (fp32 masters + Adam moments) per rank at stages 1 and 2 is 1/N of stage 0's, up to
the padding of each group to a multiple of N; stage 2 also holds 1/N of the gradients (plus the
bucket being reduced). The table for N = 1, 2, 4 is printed (run with -s to see it).
"""

import pytest

import ds_core
from ds_zero import estimate_memory, format_memory_table, memory_report

from ._train import batch, config, make_model, train


def _reports():
    rows = []
    for stage in (0, 1, 2):
        engine, *_ = ds_core.initialize(model=make_model(), config=config(
            stage=stage, bf16={"enabled": True}, zero_optimization={"stage": stage, "reduce_bucket_size": 5000}))
        train(engine, 1)
        rows.append(memory_report(engine))
    return rows


def _check(rows, world):
    s0, s1, s2 = rows
    psi = s0["num_params"]
    pad = 12 * (world - 1)  # at most world-1 padding elements of 12 bytes (one group)
    assert s0["optimizer_states"] == 12 * psi
    for r in (s1, s2):
        assert abs(r["optimizer_states"] - s0["optimizer_states"] / world) <= pad
        assert r["optimizer_states"] == estimate_memory(psi, world, r["stage"], "bf16")["ds"]["optimizer_states"]
        assert r["params"] - 2 * psi < 2 * world  # replicated bf16 parameters (+ padding)
    assert s1["gradients"] - 4 * psi < 4 * world  # stage 1 keeps full fp32 gradients
    bucket = 4 * 5000 * 2  # up to two buckets in flight, each at most a bucket plus one parameter
    assert s2["gradients"] - 4 * -(-psi // world) <= bucket + 4 * 64 * 32
    return rows


def _run(world):
    return _check(_reports(), world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_optimizer_state_is_one_nth_per_rank(world, distributed):
    rows = distributed.run(_run, world, args=(world,), timeout=240)[0]
    print(f"\nper-rank bytes, GPT {rows[0]['num_params']:,} params, bf16 AdamW, N = {world}")
    print(format_memory_table(rows))


def test_formula_matches_the_paper():
    psi, n = 7_500_000_000, 64  # the paper's example: 7.5B parameters, N = 64, K = 12
    assert estimate_memory(psi, n, 0)["paper"]["total"] == 120_000_000_000
    assert estimate_memory(psi, n, 1)["paper"]["total"] == pytest.approx(31.4e9, rel=1e-2)
    assert estimate_memory(psi, n, 2)["paper"]["total"] == pytest.approx(16.6e9, rel=1e-2)
    assert estimate_memory(psi, n, 3)["paper"]["total"] == 1_875_000_000  # "1.9GB" in figure 1
    off = estimate_memory(psi, n, 2, offload=True)["ds"]
    assert off["optimizer_states"] == 0 and off["host"] > 0
    with pytest.raises(ValueError, match="stage 4"):
        estimate_memory(psi, n, 4)
    assert batch  # the helper module imports cleanly
