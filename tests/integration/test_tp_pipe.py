"""Tensor parallelism composed with the pipeline: 2 stages × tensor 2 on 4 ranks against the same layers
unpipelined and unsharded on one process — losses and global gradient norms (clipping by the norm of
every stage and every tensor shard, each once) equal to 1e-5 over 6 steps of 2 micro-batches. A second
model ties one transformer block across both stages (a tied module whose weights are also
tensor-sharded): its gradients are summed over the tie and its shards counted once in the norm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_core.testing.harness import run_distributed
from ds_core.testing.models import synthetic_tokens
from tests.ds_parallel._models import Block, GPTConfig
from tests.ds_pipe._gpt import Embedding

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=4)
STEPS, ACCUM, CLIP, LR = 6, 2, 0.05, 1e-3


BLOCK_PARAMS = [f"{m}.{w}" for m in ("ln1", "qkv", "proj", "ln2", "mlp.up", "mlp.down") for w in ("weight", "bias")]


def _specs(tied: bool = False):
    from ds_pipe import LayerSpec, TiedLayerSpec

    if tied:  # the same block at layer 1 (stage 0) and layer 3 (stage 1), seeded as layer 1
        block = [TiedLayerSpec("block", Block, CFG, tied_weight_attr=BLOCK_PARAMS), LayerSpec(Block, CFG),
                 TiedLayerSpec("block", Block, CFG, tied_weight_attr=BLOCK_PARAMS)]
        return [LayerSpec(Embedding, CFG), *block, LayerSpec(nn.LayerNorm, CFG.dim),
                LayerSpec(nn.Linear, CFG.dim, CFG.vocab_size, bias=False)]
    return [LayerSpec(Embedding, CFG), *[LayerSpec(Block, CFG) for _ in range(CFG.layers)],
            LayerSpec(nn.LayerNorm, CFG.dim), LayerSpec(nn.Linear, CFG.dim, CFG.vocab_size, bias=False)]


def _loss(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _data():
    for step in range(STEPS):
        for i in range(ACCUM):
            yield synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, step * ACCUM + i)


def _reference(tied: bool = False):
    """The layers seeded as PipelineModule(seed_layers=True) seeds them, in one module, one process (a
    tied layer is its first occurrence's module, used again)."""
    layers, ties = [], {}
    for idx, spec in enumerate(_specs(tied)):
        key = getattr(spec, "key", None)
        if key in ties:
            layers.append(ties[key])
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234 + idx)
            layers.append(spec.build())
        if key is not None:
            ties[key] = layers[-1]
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out, it = [], _data()
    for _ in range(STEPS):
        total = 0.0
        for _ in range(ACCUM):
            x, y = next(it)
            loss = _loss(model(x), y)
            (loss / ACCUM).backward()
            total += loss.item() / ACCUM
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        out.append((total, norm.item()))
    return out


def _engine(tied: bool, seed: int = 1234):
    import torch.distributed as dist

    import ds_core
    from ds_pipe import PipelineModule

    topology = ds_core.comm.Topology(dist.get_world_size(), pipe=2, tensor=2)
    model = PipelineModule(_specs(tied), topology=topology, loss_fn=_loss, seed_layers=True, base_seed=seed,
                           partition_method="uniform" if tied else "parameters")
    if tied:
        assert model.tie_owners("block") == [0, 1]
    engine, *_ = ds_core.initialize(model=model, optimizer=lambda groups: torch.optim.AdamW(groups, lr=LR), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": ACCUM, "steps_per_print": 0,
        "gradient_clipping": CLIP, "tensor_parallel": {"autotp_size": 2}})
    return engine


def _more():
    for i in range(2 * ACCUM):
        yield synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, 100 + i)


def _run(tied: bool = False, root: str | None = None):
    import torch.distributed as dist

    engine = _engine(tied)
    it = _data()
    out = [(float(engine.train_batch(it)), engine.get_global_grad_norm()) for _ in range(STEPS)]
    sharded = sum(1 for n, _ in engine.module.named_parameters() if "#tp:" in n)
    resume = None
    if root is not None:  # per-layer files per tensor rank: a reload continues exactly
        engine.save_checkpoint(root, tag="saved")
        it = _more()
        continued = [float(engine.train_batch(it)) for _ in range(2)]
        fresh = _engine(tied, seed=99)  # other initial weights: everything must come from the checkpoint
        fresh.load_checkpoint(root, tag="saved")
        it = _more()
        resume = (continued, [float(fresh.train_batch(it)) for _ in range(2)])
    return out, _reference(tied) if dist.get_rank() == 0 else None, sharded, resume


@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied-sharded-block"])
def test_pipe2_tp2_matches_unpipelined_unsharded(tied, tmp_path):
    results = run_distributed(_run, 4, args=(tied, str(tmp_path) if tied else None), timeout=600)
    ref = results[0][1]
    if tied:
        for *_, (continued, resumed) in results:
            assert resumed == continued  # the pipeline x tensor checkpoint reloads exactly
        assert sorted(p.name for p in (tmp_path / "saved").glob("tp1_layer_*"))  # one file set per tensor rank
    for out, _, sharded, _ in results:
        assert sharded > 0  # each stage's blocks are tensor-parallel
        for (loss, norm), (ref_loss, ref_norm) in zip(out, ref):
            assert abs(loss - ref_loss) < 1e-5, (out, ref)
            assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (out, ref)
