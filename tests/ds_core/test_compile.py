"""``engine.compile()``: torch.compile (inductor on CPU) of the wrapped model under the engine.

Reference: the same engine uncompiled, same seed and data. Tolerance: per-step fp32 losses within 1e-4
over 4 steps (inductor fuses and reorders floating-point operations, so the last bits may differ).
The compiled engines are built once per module (compiling takes most of the time).
"""

import pytest
import torch

import ds_core
from ds_core.errors import DSError
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=32, seq_len=8, dim=16, layers=1, heads=2)
STEPS = 4


def _config(**over):
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    base.update(over)
    return base


def _engine(**over):
    torch.manual_seed(0)
    return ds_core.initialize(model=GPT(CFG), config=_config(**over))[0]


def _train(engine):
    losses = []
    for step in range(STEPS):
        x, y = synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, step, 0)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def runs():
    out = {}
    for stage in (0, 2):
        over = {"zero_optimization": {"stage": stage}} if stage else {}
        eager = _engine(**over)
        compiled = _engine(**over)
        compiled.compile(backend="inductor")
        out[stage] = (_train(eager), _train(compiled), compiled)
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_compiled_losses_match_eager(runs, stage):
    eager, compiled, engine = runs[stage]
    assert engine.is_compiled
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4


def test_compiling_keeps_parameters_and_state_dict_keys(runs):
    engine = runs[0][2]
    assert all(k.startswith("module.") and "_orig_mod" not in k for k in engine.state_dict())
    assert engine.module.__class__ is GPT
    engine.compile()  # a second call changes nothing
    assert engine.is_compiled


def test_uncompiled_engine_says_so():
    assert not _engine().is_compiled


def test_zero_3_and_schedules_are_refused():
    engine = _engine(zero_optimization={"stage": 3})
    with pytest.raises(DSError, match="ZeRO stage 3"):
        engine.compile()
    assert not engine.is_compiled
    with pytest.raises(DSError, match="schedule"):
        _engine().compile(schedule=[(0, "x")])
