"""Training with ``tensor_parallel: {"autotp_size": 2}`` through ``ds_core.initialize`` against the
unsharded model on one process: losses equal to 1e-5 over 20 steps with AdamW and gradient clipping,
and the global gradient norm of every step equal to 1e-5 relative (it must add the squared norms of
every tensor shard once, and of replicated KV heads once), for a plain GPT, a tiny
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
        norms, ref_norms = [], []
        losses, engine = engine_losses(kind, _config(dp), dp_rank=dp_rank, dp=dp, norms=norms)
        out[kind] = {"losses": losses, "norms": norms,
                     "reference": reference_losses(kind, norms=ref_norms) if topo_rank == 0 else None,
                     "reference_norms": ref_norms,
                     "tensor": engine.topology.size("tensor"), "data": engine.dp_world_size,
                     "sharded": isinstance(getattr(engine.module, "ds_tp_group", None), TensorGroup)}
        engine.destroy()
    out["bad"] = _bad_input(dist.get_world_size())
    return out


def _refused(kind, config):
    """The error every rank raises for ``config`` (each then meets the others at a barrier: none hangs)."""
    import torch.distributed as dist

    from ds_core.errors import DSError

    try:
        engine_losses(kind, config, steps=0)
    except DSError as exc:
        dist.barrier()
        return f"{type(exc).__name__}: {exc}"
    return None


def _bad_input(world):
    base = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0}
    out = {"size not dividing the world": _refused("gpt", {**base, "tensor_parallel": {"autotp_size": 3}})}
    if world == 4:  # 6 query heads cannot split over 4 ranks (nor 2 KV heads be replicated into them)
        out["heads not dividing"] = _refused("llama", {**base, "tensor_parallel": {"autotp_size": 4}})
        out["missing module"] = _refused("llama", {**base, "tensor_parallel": {
            "autotp_size": 2, "overrides": {"model.layers.*.mlp.dwn_proj": "rowwise"}}})
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
    # Adam barely notices a wrong clipping factor: check the global norm itself (every shard once)
    for r in results:
        for step, (got, want) in enumerate(zip(r[kind]["norms"], results[0][kind]["reference_norms"])):
            assert abs(got - want) <= 1e-5 * want, (kind, step, got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_tp2_matches_unsharded(tp2, kind):
    _check(tp2, kind, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_tp2_dp2_matches_unsharded(tp2_dp2, kind):
    _check(tp2_dp2, kind, 2)


def test_bad_tensor_parallel_input_is_refused_on_every_rank(tp2, tp2_dp2):
    expected = {  # (error type, text it says)
        "size not dividing the world": ("CommError", "is not divisible by pipe 1 × sequence 1 × tensor 3"),
        "heads not dividing": ("ConfigError", "attention module 'model.layers.0.self_attn': 6 query heads cannot be "
                                              "split over tensor-parallel size 4"),
        "missing module": ("ConfigError", "tp_plan override 'model.layers.*.mlp.dwn_proj' names no module"),
    }
    seen = set()
    for results in (tp2, tp2_dp2):
        for rank in results:
            for case, message in rank["bad"].items():
                kind, text = expected[case]
                assert message is not None and message.startswith(kind) and text in message, (case, message)
                seen.add(case)
    assert seen == set(expected)
