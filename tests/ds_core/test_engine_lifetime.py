"""A dropped engine is freed: its gradient hooks must not keep the reducer (and all it holds) alive."""

import gc
import weakref

import torch

import ds_core
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=32, seq_len=8, dim=16, layers=1, heads=2, dropout=0.0)


def engine_is_freed(config: dict) -> None:
    """Train one step, drop the engine, and check its reducer and optimizer are collected while the
    model (and its hooked parameters) lives on and still trains under a new engine."""
    torch.manual_seed(0)
    model = GPT(CFG)
    engine = ds_core.initialize(model=model, config=config)[0]  # keep no other returned object
    x, y = synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, 0, 0)
    engine.backward(engine(x, y))
    engine.step()
    refs = [weakref.ref(engine.reducer), weakref.ref(engine.optimizer), weakref.ref(engine)]
    del engine
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    again, *_ = ds_core.initialize(model=model, config=config)  # old hooks are inert, not in the way
    again.backward(again(x, y))
    again.step()


def test_dropped_engine_is_freed():
    engine_is_freed({"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
