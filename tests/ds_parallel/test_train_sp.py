"""A stock Hugging Face Llama trained with its sequence split over 2 ranks (Ulysses) against the
unsharded model on one process: losses equal to 1e-5 over 20 steps (AdamW, gradient clipping).

Ranks see half of every sequence (``shard_batch``: labels shifted before the cut, global
``position_ids``); attention is the model's own SDPA on full sequences of half the heads between two
all-to-alls; the loss is the mean over the valid tokens of both halves; gradients are summed over the
sequence group. Two models: 4 query / 2 KV heads, and 6 query heads with one KV head (replicated
before the exchange).
"""

import pytest
import torch

from ds_core.testing.harness import run_distributed
from ds_core.testing.models import synthetic_tokens

from ._models import SMALL

STEPS, B, S, LR, CLIP = 20, 2, 16, 3e-3, 0.5


def _config(kind):
    import transformers as t

    heads, kv = {"llama": (4, 2), "llama_kv1": (6, 1)}[kind]
    cfg = t.LlamaConfig(**SMALL, num_attention_heads=heads, num_key_value_heads=kv)
    cfg._attn_implementation = "sdpa"
    return cfg


def _model(kind):
    import transformers as t

    torch.manual_seed(0)
    return t.AutoModelForCausalLM.from_config(_config(kind)).float()


def _batch(step):
    ids, _ = synthetic_tokens(B, S, 64, step % 2)  # two batches of a learnable sequence task
    ids[1, -3:] = 0  # a right-padded sample: no loss on its padding
    labels = ids.clone()
    labels[1, -3:] = -100
    return {"input_ids": ids, "labels": labels}


def _optimizer(groups):
    return torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)


def _reference(kind):
    model = _model(kind)
    opt = _optimizer(model.parameters())
    losses = []
    for step in range(STEPS):
        loss = model(**_batch(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


MEMORY_LENGTHS = (256, 1024)


def _activation_bytes(model, batch, group):
    """Bytes autograd saves in one forward (the activations a step holds until backward), weights excluded."""
    from ds_parallel import saved_activation_bytes, shard_batch

    batch = shard_batch(batch, group) if group is not None else batch
    return saved_activation_bytes(lambda: model(**batch).loss, exclude=list(model.parameters()))[1]


def _memory(model, rank):
    """Per-rank activation bytes of one forward at SP 2 (and at SP 1 on rank 0), at two lengths."""
    out = {}
    for length in MEMORY_LENGTHS:
        ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
        batch = {"input_ids": ids, "labels": ids}
        sp1 = _activation_bytes(_model("llama"), batch, None) if rank == 0 else None
        out[length] = (sp1, _activation_bytes(model, batch, model.ds_sp_group))
    return out


def _sp_run(kinds):
    import torch.distributed as dist

    import ds_core
    from ds_parallel import sequence_parallel, shard_batch

    out = {}
    for name in kinds:
        kind = name.removesuffix("-config")
        config = {"train_micro_batch_size_per_gpu": B, "gradient_clipping": CLIP, "steps_per_print": 0}
        if name.endswith("-config"):  # the config alone: sequence_parallel_size selects ds-parallel's wrapper
            model = _model(kind)
            config["sequence_parallel_size"] = 2
        else:
            model = sequence_parallel(_model(kind), sp_size=2)
        engine, *_ = ds_core.initialize(model=model, optimizer=_optimizer, config=config)
        model = engine.module
        losses = []
        for step in range(STEPS):
            loss = engine(**shard_batch(_batch(step), model.ds_sp_group)).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[name] = {"losses": losses, "sequence": engine.topology.size("sequence"),
                     "data": engine.dp_world_size,
                     "reference": _reference(kind) if dist.get_rank() == 0 and name == kind else None}
        if name == "llama":
            out["memory"] = _memory(engine.module, dist.get_rank())
        engine.destroy()
    return out


KINDS = ("llama", "llama_kv1", "llama-config")


@pytest.fixture(scope="module")
def sp2():
    return run_distributed(_sp_run, 2, args=(KINDS,))


@pytest.mark.parametrize("kind", KINDS)
def test_llama_sp2_matches_unsharded(sp2, kind):
    ref = sp2[0][kind.removesuffix("-config")]["reference"]
    for rank in sp2:
        r = rank[kind]
        assert r["sequence"] == 2 and r["data"] == 1
        for step, (got, want) in enumerate(zip(r["losses"], ref)):
            assert abs(got - want) < 1e-5, (kind, step, got, want)  # every rank logs the whole loss
    assert ref[-1] < ref[0]


def test_sp2_activation_memory_is_half_of_sp1(sp2):
    """Measured: bytes autograd saves for backward per rank (weights excluded), SP 2 vs SP 1."""
    print("\nactivation bytes per rank, tiny Llama (4 heads, 2 KV heads, hidden 48), batch 2:")
    print(f"{'sequence':>9} {'SP 1':>12} {'SP 2 rank 0':>12} {'SP 2 rank 1':>12} {'ratio':>6}")
    for length in MEMORY_LENGTHS:
        sp1 = sp2[0]["memory"][length][0]
        ranks = [r["memory"][length][1] for r in sp2]
        ratio = max(ranks) / sp1
        print(f"{length:>9} {sp1:>12,} {ranks[0]:>12,} {ranks[1]:>12,} {ratio:>6.3f}")
        assert 0.45 < ratio < 0.6, (length, sp1, ranks)  # half the tokens: half the activations


def _tp_sp_run():
    """Tensor 2 × sequence 2 on 4 ranks, both from the config: the tensor_parallel section shards the
    heads, ``sequence_parallel_size`` splits the sequence, both inside ``initialize``."""
    import torch.distributed as dist

    import ds_core
    from ds_parallel import shard_batch

    engine, *_ = ds_core.initialize(model=_model("llama"), optimizer=_optimizer, config={
        "train_micro_batch_size_per_gpu": B, "gradient_clipping": CLIP, "steps_per_print": 0,
        "tensor_parallel": {"autotp_size": 2}, "sequence_parallel_size": 2})
    assert engine.topology.size("tensor") == 2 and engine.topology.size("sequence") == 2
    losses = []
    for step in range(STEPS):
        loss = engine(**shard_batch(_batch(step), engine.module.ds_sp_group)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, _reference("llama") if dist.get_rank() == 0 else None


def test_llama_tp2_sp2_matches_unsharded():
    results = run_distributed(_tp_sp_run, 4, timeout=600)
    ref = results[0][1]
    for losses, _ in results:
        assert max(abs(a - b) for a, b in zip(losses, ref)) < 1e-5
