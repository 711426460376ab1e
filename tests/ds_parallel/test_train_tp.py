"""Training with ``tensor_parallel: {"autotp_size": 2}`` through ``ds_core.initialize`` against the
unsharded model on one process: losses equal to 1e-5 over 20 steps with AdamW and gradient clipping
(the global norm must add the squared norms of every tensor shard once), for a plain GPT, a tiny
random HF Llama with grouped-query attention, and one whose 3 KV heads do not divide 2 (replicated).

Tensor parallel 2 runs on 2 ranks; tensor 2 × data 2 on 4 ranks (each data rank half the batch).
"""

import pytest

from ds_core.testing.harness import run_distributed

from ._train import STEPS, engine_losses, reference_losses

KINDS = ("gpt", "llama", "llama_kv3")
TOL = 1e-5


def _config(dp):
    return {"train_micro_batch_size_per_gpu": 4 // dp, "gradient_clipping": 0.5, "steps_per_print": 0,
            "tensor_parallel": {"autotp_size": 2}}


def _run(dp):
    import torch.distributed as dist

    from ds_parallel import TensorGroup

    out = {}
    for kind in KINDS:
        topo_rank = dist.get_rank()
        dp_rank = topo_rank // 2  # layout (data, tensor): tensor is the inner axis
        losses, engine = engine_losses(kind, _config(dp), dp_rank=dp_rank, dp=dp)
        out[kind] = {"losses": losses, "reference": reference_losses(kind) if topo_rank == 0 else None,
                     "tensor": engine.topology.size("tensor"), "data": engine.dp_world_size,
                     "sharded": isinstance(getattr(engine.module, "ds_tp_group", None), TensorGroup)}
        engine.destroy()
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_run, 2, args=(1,))


@pytest.fixture(scope="module")
def tp2_dp2():
    return run_distributed(_run, 4, args=(2,), timeout=600)


def _check(results, kind, dp):
    ref = results[0][kind]["reference"]
    assert len(ref) == STEPS
    for r in results:
        assert r[kind]["tensor"] == 2 and r[kind]["data"] == dp and r[kind]["sharded"]
    for step in range(STEPS):
        # each data rank reports the mean over its half of the batch; their average is the batch mean
        got = sum(results[2 * d][kind]["losses"][step] for d in range(dp)) / dp
        assert abs(got - ref[step]) < TOL, (kind, step, got, ref[step])
    assert ref[-1] < ref[0]  # it learns


@pytest.mark.parametrize("kind", KINDS)
def test_tp2_matches_unsharded(tp2, kind):
    _check(tp2, kind, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_tp2_dp2_matches_unsharded(tp2_dp2, kind):
    _check(tp2_dp2, kind, 2)
