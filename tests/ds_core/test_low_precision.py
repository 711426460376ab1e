"""Low-precision training state (docs/precision.md): bf16/fp16 masters and gradients with stochastic
rounding, bf16 optimizer state, ``data_types.grad_accum_dtype``.

References and tolerances:
- stochastic rounding against its definition: only the two neighbours, the mean of 4,000 draws within
  5 standard errors of the exact value, the same seed gives the same draw;
- a bf16 weight of 1.0 under Adam at lr 1e-3 (an update below half the bf16 spacing): round-to-nearest
  never moves it, stochastic rounding follows the fp32 trajectory to 2e-3 after 100 steps;
- the tiny GPT on 2 gloo ranks, 40 steps at lr 2e-4: bf16 masters with stochastic rounding end within
  2e-3 (mean loss of the last 5 steps) of fp32 masters; round-to-nearest ends at least 3x further away;
- a resumed run (fresh model, load, more steps) equals the uninterrupted one bit for bit.
"""

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.config import parse_config
from ds_core.engine.low_precision import round_to, stochastic_round
from ds_core.engine.precision import Precision
from ds_core.errors import ConfigError
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)
BF16 = {"enabled": True}
MASTERS = {"enabled": True, "bf16_master_weights_and_grads": True}
ALL_BF16 = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def _config(lr=2e-4, **over):
    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 0, "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}}}
    base.update(over)
    return base


def _engine(**over):
    torch.manual_seed(0)
    engine, *_ = ds_core.initialize(model=GPT(CFG), config=_config(**over))
    return engine


def _train(engine, steps, first=0):
    rank = dist.get_rank() if dist.is_initialized() else 0
    acc = engine.gradient_accumulation_steps()
    losses = []
    for step in range(first, first + steps):
        for m in range(acc):
            x, y = synthetic_tokens(4, CFG.seq_len, CFG.vocab_size, step * acc + m, rank)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return losses


# -- rounding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(dtype):
    lo = torch.tensor(1.0, dtype=dtype)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=dtype))
    x = torch.full((4000,), lo.float() + 0.3 * (hi.float() - lo.float()))
    gen = torch.Generator().manual_seed(1)
    out = stochastic_round(x, dtype, gen)
    assert out.dtype == dtype
    assert set(out.float().unique().tolist()) <= {lo.item(), hi.item()}
    frac = (out == hi).float().mean().item()
    assert abs(frac - 0.3) < 5 * (0.3 * 0.7 / 4000) ** 0.5
    again = stochastic_round(x, dtype, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    exact = torch.tensor([0.5, -2.0, 0.0])  # representable values stay as they are
    assert torch.equal(stochastic_round(exact, dtype, gen).float(), exact)


def test_round_to_nearest_stalls_where_stochastic_rounding_follows_fp32():
    """Adam at lr 1e-3 on a weight of 1.0: every update is below half of bf16's spacing there (2**-8)."""
    def run(rounding):
        w = torch.nn.Parameter(torch.ones(1024))
        opt = torch.optim.Adam([w], lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(100):
            w.grad = torch.full_like(w, 0.5)
            opt.step()  # the exact update, -1e-3 each step
            with torch.no_grad():
                w.copy_(round_to(w.detach(), torch.bfloat16, rounding, gen).float())
        return w.detach()

    assert torch.equal(run("nearest"), torch.ones(1024))  # stalled: not one update survived
    # fp32 ends at 0.9; one element's spread is ~0.017, the mean of 1024 ~5e-4
    assert abs(run("stochastic").mean().item() - (1.0 - 100 * 1e-3)) < 2e-3


@pytest.mark.parametrize("opt", ["AdamW", "SGD"])
def test_large_tensors_stepped_in_slices_equal_one_pass(monkeypatch, opt):
    """A tensor larger than CHUNK_NUMEL is stepped slice by slice; with an elementwise optimizer and
    deterministic rounding (nearest) that is bit for bit one pass over the whole tensor."""
    from ds_core.engine import low_precision

    precision = Precision("bf16", torch.bfloat16, torch.bfloat16, False, torch.bfloat16, torch.bfloat16, "nearest")

    def make(groups, device_type):
        if opt == "SGD":
            return torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
        return torch.optim.AdamW(groups, lr=1e-2)

    def run(chunk):
        monkeypatch.setattr(low_precision, "CHUNK_NUMEL", chunk)
        torch.manual_seed(0)
        big, small = torch.randn(1000).bfloat16(), torch.randn(7, 3).bfloat16()
        grads = [torch.zeros_like(big), torch.zeros_like(small)]
        stepper = low_precision.LowPrecisionStepper([{"params": [big, small]}], [grads], make, "cpu", precision)
        for _ in range(3):
            for g in grads:
                g.copy_(torch.randn(g.shape))
            stepper.step(0.5)
        return [big, small], stepper.optimizer.state_dict()["state"]

    (w1, s1), (w2, s2) = run(1 << 24), run(64)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    for idx in s1:
        for k, v in s1[idx].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2[idx][k])), (idx, k)
            if torch.is_tensor(v) and v.dim():
                assert v.dtype == torch.bfloat16 and v.shape == s2[idx][k].shape


# -- config --------------------------------------------------------------------------------------------
def _precision(**over):
    return Precision.from_config(parse_config({"train_batch_size": 1, **over}))


def test_precision_follows_the_keys():
    p = _precision(bf16=MASTERS)
    assert (p.master_dtype, p.grad_dtype, p.state_dtype, p.has_masters) == (
        torch.bfloat16, torch.bfloat16, torch.float32, False)
    assert _precision(bf16=ALL_BF16).state_dtype == torch.bfloat16
    assert _precision(bf16=BF16).master_dtype == torch.float32 and not _precision(bf16=BF16).low_precision
    p = _precision(data_types={"grad_accum_dtype": "bf16"})
    assert (p.dtype, p.grad_dtype, p.low_precision) == (torch.float32, torch.bfloat16, True)
    p = _precision(fp16={"enabled": True, "fp16_master_weights_and_grads": True})
    assert (p.master_dtype, p.grad_dtype, p.loss_scaling) == (torch.float16, torch.float16, True)


@pytest.mark.parametrize("over, words", [
    ({"bf16": {"bf16_master_weights_and_grads": True}}, ["bf16.enabled", "fp32"]),
    ({"fp16": {"fp16_master_weights_and_grads": True}, "bf16": BF16}, ["fp16.enabled", "bf16"]),
    ({"bf16": MASTERS, "data_types": {"grad_accum_dtype": "fp32"}}, ["grad_accum_dtype", "drop one"]),
    ({"bf16": MASTERS, "zero_optimization": {"stage": 3}}, ["stage 3", "stage 2"]),
    ({"bf16": BF16, "data_types": {"grad_accum_dtype": "fp16"}}, ["without loss scaling", "'bf16'"]),
    ({"bf16": ALL_BF16, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme",
                                                                                 "nvme_path": "/tmp"}}},
     ["nvme", "device cpu"]),
])
def test_unsupported_combinations_are_refused(over, words):
    with pytest.raises(ConfigError) as info:
        _precision(**over)
    for w in words:
        assert w in str(info.value)


# -- training ------------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.world_size(2)
def test_bf16_masters_train_like_fp32_masters_and_rounding_matters():
    steps = 40
    tail = {}
    for name, over in [("fp32 masters", {"bf16": BF16}), ("stochastic", {"bf16": MASTERS}),
                       ("nearest", {"bf16": MASTERS, "data_types": {"master_weights_rounding": "nearest"}})]:
        engine = _engine(**over)
        losses = _train(engine, steps)
        tail[name] = sum(losses[-5:]) / 5
        if name == "stochastic":
            # the masters are the bf16 weights, their gradients bf16, one rounding stream for both ranks
            assert engine.strategy.grads.buffer.dtype == torch.bfloat16
            assert not hasattr(engine.strategy, "flat_master")
            w = next(engine.module.parameters()).detach().clone()
            other = [torch.empty_like(w) for _ in range(2)]
            dist.all_gather(other, w)
            assert torch.equal(other[0], other[1])
        engine.destroy()
    sr = abs(tail["stochastic"] - tail["fp32 masters"])
    rn = abs(tail["nearest"] - tail["fp32 masters"])
    print(f"mean loss of the last 5 steps: {tail}")
    assert sr < 2e-3, tail
    assert rn > 3 * sr, tail


@pytest.mark.world_size(2)
def test_grad_accum_dtype_sets_the_buffer_and_trains():
    engine = _engine(data_types={"grad_accum_dtype": "bf16"}, gradient_accumulation_steps=2,
                     train_micro_batch_size_per_gpu=4)
    assert engine.strategy.grads.buffer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    losses = _train(engine, 6)
    reference = _engine(gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=4)
    expected = _train(reference, 6)
    # bf16 accumulation of fp32 gradients: the same run to bf16's resolution
    assert max(abs(a - b) for a, b in zip(losses, expected)) < 5e-3


@pytest.mark.world_size(2)
def test_resume_with_bf16_masters_and_state_is_exact(tmp_path):
    engine = _engine(bf16=ALL_BF16)
    _train(engine, 3)
    engine.save_checkpoint(tmp_path)
    expected = _train(engine, 2, first=3)
    state = next(iter(engine.strategy.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    fresh = _engine(bf16=ALL_BF16)
    fresh.load_checkpoint(tmp_path)
    assert _train(fresh, 2, first=3) == expected
    assert all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), fresh.module.parameters()))
    # the saved optimizer state is bf16 on disk too
    from safetensors import safe_open
    with safe_open(str(tmp_path / "global_step3" / "optimizer.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "exp_avg" in k} == {"BF16"}


@pytest.mark.world_size(2)
def test_fp32_master_checkpoint_loads_into_bf16_masters_and_back(tmp_path):
    fp32m = _engine(bf16=BF16)
    _train(fp32m, 2)
    fp32m.save_checkpoint(tmp_path / "fp32m")
    low = _engine(bf16=ALL_BF16)
    low.load_checkpoint(tmp_path / "fp32m")
    # the bf16 weights were saved as the fp32 masters rounded to nearest: they are the masters now
    assert all(torch.equal(a, b) for a, b in zip(fp32m.module.parameters(), low.module.parameters()))
    state = next(iter(low.strategy.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16
    after = _train(low, 2, first=2)
    ref = _train(fp32m, 2, first=2)
    assert max(abs(a - b) for a, b in zip(after, ref)) < 5e-3
    low.save_checkpoint(tmp_path / "low")
    back = _engine(bf16=BF16)
    back.load_checkpoint(tmp_path / "low")
    masters = back.strategy.flat_master
    assert masters.dtype == torch.float32
    assert all(torch.equal(back.strategy.master_of(p).to(torch.bfloat16), p)
               for p in back.module.parameters())
    assert next(iter(back.strategy.optimizer.state.values()))["exp_avg"].dtype == torch.float32
    _train(back, 1, first=4)


@pytest.mark.world_size(2)
def test_fp16_masters_with_loss_scaling_train():
    engine = _engine(lr=1e-3, fp16={"enabled": True, "fp16_master_weights_and_grads": True,
                                   "initial_scale_power": 8})
    assert engine.strategy.grads.buffer.dtype == torch.float16
    losses = _train(engine, 8)
    assert all(p.dtype == torch.float16 for p in engine.module.parameters())
    assert losses[-1] < losses[0]
