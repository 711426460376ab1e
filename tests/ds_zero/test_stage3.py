"""ZeRO stage 3 against plain PyTorch DDP (2 gloo ranks, tiny GPT with tied head/embedding).

Tolerance: fp32 losses equal to DDP's to 1e-5 (absolute) over 20 steps, with AdamW and clipping.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from ds_zero.reduce3 import Stage3GradientReducer

from ._train import CFG, batch, config, ddp_losses, engine_losses, make_model, max_diff


@pytest.mark.world_size(2)
def test_stage3_matches_ddp_fp32():
    model = make_model()
    assert model.head.weight is model.tok.weight  # tied
    ref = ddp_losses(copy.deepcopy(model), 20)
    ours, engine = engine_losses(copy.deepcopy(model), 20, zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 40, "overlap_comm": True})
    assert isinstance(engine.reducer, Stage3GradientReducer)
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    parts = engine.optimizer.parts
    # released: big parameters hold a placeholder, small ones (<= 40 elements) stay whole
    for g in parts.groups:
        for s in g.sharded:
            assert s.gathered == s.persistent, s.name
            assert s.users == 0 and not s.held_for_backward
    numel = sum(p.numel() for p in model.parameters())
    assert engine.optimizer.masters[0].numel() <= numel // 2 + 64


class _BranchGPT(torch.nn.Module):
    """The test GPT plus a layer used only on even steps: some micro-steps reduce it as zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = make_model()
        self.side = torch.nn.Linear(CFG.dim, CFG.dim)
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        if self.calls % 2:
            return self.gpt(x, y)
        return self.gpt(x, y) + self.side(self.gpt.tok(x)).pow(2).mean() * 1e-2


@pytest.mark.world_size(2)
@pytest.mark.parametrize("layout", ["all_reduce", "reduce_scatter"])
def test_stage3_gradient_buckets_match_ddp(layout):
    """Several parameters per collective (both bucket layouts, overlap, accumulation, a parameter without
    a gradient in some micro-steps) give DDP's losses to 1e-5, with fewer collectives than parameters."""
    import ds_zero.reduce

    if layout == "reduce_scatter":  # this process only: the reduce_scatter_tensor layout used off gloo
        ds_zero.reduce.GLOO_PREFERS_ALL_REDUCE = False
    torch.manual_seed(0)
    model = _BranchGPT()
    ref = ddp_losses(copy.deepcopy(model), 6, accumulation=2, find_unused=True)
    for bucket in (3000, 5e8):
        ours, engine = engine_losses(copy.deepcopy(model), 6, accumulation=2, zero_optimization={
            "stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True,
            "reduce_bucket_size": bucket})
        assert max_diff(ours, ref) < 1e-5, (bucket, ours, ref)
        reducer = engine.reducer
        assert reducer.gloo == (layout == "all_reduce")
        flushes: list[bool] = []

        def counted(reducer=reducer, flushes=flushes, flush=reducer._flush):
            flushes.append(reducer.bucket is not None)  # an open bucket: one collective
            flush()

        reducer._flush = counted
        engine.backward(engine(*batch(4, 99)))
        n = sum(len(g.sharded) for g in engine.optimizer.parts.groups)
        launched = sum(flushes)
        assert (1 < launched < n) if bucket == 3000 else launched == 1, (bucket, launched, n)


class TwiceNet(torch.nn.Module):
    """``shared`` runs twice per forward; ``norm`` is small (persistent with the default threshold)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.shared = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x, y):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = self.norm(self.shared(h))
        return torch.nn.functional.cross_entropy(self.out(h), y)


def _twice_batch(step: int):
    g = torch.Generator().manual_seed(100 * step + dist.get_rank())
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


@pytest.mark.world_size(2)
def test_module_called_twice_accumulation_and_no_grad_eval():
    import ds_core

    torch.manual_seed(0)
    model = TwiceNet()
    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    engine, *_ = ds_core.initialize(model=copy.deepcopy(model), config={
        "train_micro_batch_size_per_gpu": 6, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
        "steps_per_print": 0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 20}})
    for step in range(6):
        for m in range(2):
            x, y = _twice_batch(2 * step + m)
            (ddp(x, y) / 2).backward()
            engine.backward(engine(x, y))
            engine.step()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        x, y = _twice_batch(1000 + step)
        with torch.no_grad():
            ref, ours = ddp.module(x, y), engine(x, y)
        assert abs(float(ref) - float(ours)) < 1e-5, (step, float(ref), float(ours))
    assert not any(s.gathered for g in engine.optimizer.parts.groups for s in g.sharded if not s.persistent)


def _engine(model, **zero):
    import ds_core

    return ds_core.initialize(model=model, config=config(zero_optimization={"stage": 3, **zero}))[0]


@pytest.mark.world_size(2)
def test_gathered_parameters_read_modify_and_refuse_non_modifier_changes():
    from ds_zero import GatheredParameters, ModifiedOnNonModifierRankError

    model = make_model()
    engine = _engine(copy.deepcopy(model), stage3_param_persistence_threshold=0)
    from ds_zero.released import ReleasedParameterError

    w = engine.module.tok.weight
    assert w.shape == model.tok.weight.shape  # released: metadata only, touching the values raises
    with pytest.raises(ReleasedParameterError, match="parameter tok.weight"):
        w.sum()
    with GatheredParameters(w):
        assert torch.equal(w, model.tok.weight)
    with pytest.raises(ReleasedParameterError, match="parameter tok.weight"):
        w.sum()
    with GatheredParameters([w], modifier_rank=1):
        if dist.get_rank() == 1:
            with torch.no_grad():
                w.fill_(0.5)
    with GatheredParameters(w):
        assert bool((w == 0.5).all())
    # the optimizer's shard saw it too: a step from here starts from 0.5
    assert bool((engine.optimizer.masters[0] == engine.optimizer.parts.groups[0].own()).all())
    with pytest.raises(ModifiedOnNonModifierRankError, match=r"rank\(s\) \[0\].*modifier_rank is None"):
        with GatheredParameters(w):
            if dist.get_rank() == 0:
                w.data.add_(1.0)
    with GatheredParameters(w):
        assert bool((w == 0.5).all())  # the refused change was not kept


@pytest.mark.world_size(2)
def test_init_partitions_at_construction_and_trains_like_ddp():
    from ds_core.testing.models import GPT
    from ds_zero import Init, is_zero_init_parameter

    from ._train import CFG

    ref_model = make_model()
    ref = ddp_losses(copy.deepcopy(ref_model), 6)
    torch.manual_seed(0)
    with Init():
        model = GPT(CFG)
    assert all(is_zero_init_parameter(p) and not p.ds_shard.gathered for p in model.parameters())
    assert tuple(model.tok.weight.ds_shape) == tuple(model.tok.weight.shape) == (CFG.vocab_size, CFG.dim)
    engine = _engine(model)
    from ._train import train

    ours = train(engine, 6)
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    assert not hasattr(torch.nn.Module, "__init_subclass__") or "__init_subclass__" not in torch.nn.Module.__dict__


@pytest.mark.world_size(2)
def test_cpu_offload_of_parameters_and_optimizer_and_bf16():
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 10)
    ours, engine = engine_losses(copy.deepcopy(model), 10, zero_optimization={
        "stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
        "offload_optimizer": {"device": "cpu"}})
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    opt = engine.optimizer
    assert opt.offload and not opt.aliased and all(g.own().device.type == "cpu" for g in opt.parts.groups)
    low, _ = engine_losses(copy.deepcopy(model), 10, bf16={"enabled": True}, zero_optimization={"stage": 3})
    assert max_diff(low, ref) < 2e-2, (low, ref)


@pytest.mark.parametrize("section, message", [
    ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param.device 'cpu' needs stage 3"),
    ({"stage": 3, "offload_param": {"device": "cpu"}}, "needs offload_optimizer.device 'cpu' too"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, r"'nvme' needs offload_optimizer.device 'cpu' too"),
])
def test_stage3_config_errors(section, message):
    from ds_core.errors import ConfigError
    from ds_zero.config import ZeroConfig

    with pytest.raises((ConfigError, ValueError), match=message):
        ZeroConfig.model_validate(section)


def test_stage3_config_accepts_deepspeed_keys():
    from ds_zero.config import ZeroConfig

    z = ZeroConfig.model_validate({"stage": 3, "stage3_prefetch_bucket_size": "auto",
                                   "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                                   "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
                                   "cpu_offload_params": True, "cpu_offload": True})
    assert z.stage == 3 and z.stage3_param_persistence_threshold == 100_000
    assert z.offload_param.device == "cpu" and z.offload


@pytest.mark.world_size(2)
def test_memory_report_shows_parameters_partitioned():
    from ds_zero import estimate_memory, memory_report

    model = make_model()
    _, engine = engine_losses(copy.deepcopy(model), 1, zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 0})
    report = memory_report(engine)
    numel = sum(p.numel() for p in model.parameters())
    assert report["stage"] == 3 and report["num_params"] == numel
    est = estimate_memory(numel, 2, 3, precision="fp32")
    # shards: 4Ψ/N bytes up to per-parameter padding (at most N-1 elements per parameter)
    assert est["ds"]["params"] <= report["params"] <= est["ds"]["params"] + 4 * len(list(model.parameters()))
    assert report["gradients"] == report["params"]  # fp32 gradient partition, same layout
