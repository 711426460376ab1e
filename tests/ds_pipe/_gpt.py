"""A small GPT as pipeline layers, its unpipelined reference, and the training loops both use."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ds_core.testing.models import Block, GPTConfig, synthetic_tokens
from ds_pipe import LayerSpec, TiedLayerSpec

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=4, heads=2)
MICRO, ACCUM, LR = 2, 4, 1e-3


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)

    def forward(self, tokens):
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


def tied_head(embedding: Embedding, x):
    return x @ embedding.tok.weight.t()


def loss_fn(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def specs(tied: bool, cfg: GPTConfig = CFG):
    first = TiedLayerSpec("embed", Embedding, cfg, tied_weight_attr="tok.weight") if tied else LayerSpec(Embedding, cfg)
    head = (TiedLayerSpec("embed", Embedding, cfg, forward_fn=tied_head, tied_weight_attr="tok.weight") if tied
            else LayerSpec(nn.Linear, cfg.dim, cfg.vocab_size, bias=False))
    return [first, *[LayerSpec(Block, cfg) for _ in range(cfg.layers)], LayerSpec(nn.LayerNorm, cfg.dim), head]


class Reference(nn.Module):
    """The same layers in one module, seeded as PipelineModule(seed_layers=True) seeds them."""

    def __init__(self, tied: bool, base_seed: int = 1234) -> None:
        super().__init__()
        self.funcs, built = [], {}
        self.layers = nn.ModuleList()
        for idx, spec in enumerate(specs(tied)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base_seed + idx)
                if isinstance(spec, TiedLayerSpec):
                    if spec.key not in built:
                        built[spec.key] = spec.build()
                        self.layers.append(built[spec.key])
                    m = built[spec.key]
                    self.funcs.append(functools.partial(spec.forward_fn, m) if spec.forward_fn else m)
                    continue
                m = spec.build()
            self.layers.append(m)
            self.funcs.append(m)

    def forward(self, x):
        for f in self.funcs:
            x = f(x)
        return x


def micro_batch(step: int, i: int, data_rank: int):
    return synthetic_tokens(MICRO, CFG.seq_len, CFG.vocab_size, step * ACCUM + i, data_rank)


def data_iter(steps: int, data_rank: int, start: int = 0):
    for step in range(start, start + steps):
        for i in range(ACCUM):
            yield micro_batch(step, i, data_rank)


def reference_losses(steps: int, tied: bool, data_ranks: int, clip: float = 0.0) -> list[float]:
    torch.manual_seed(0)
    model = Reference(tied)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out = []
    for step in range(steps):
        total = 0.0
        for i in range(ACCUM):
            parts = [micro_batch(step, i, d) for d in range(data_ranks)]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            loss = loss_fn(model(x), y)
            (loss / ACCUM).backward()
            total += float(loss.detach()) / ACCUM
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        out.append(total)
    return out


def config(**extra):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
            "steps_per_print": 0, **extra}
