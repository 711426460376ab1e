"""The quality yardstick: a small GPT trained here, on text generated here.

The text is an order-2 Markov source over 48 symbols whose transition table (a few likely next
symbols per context, drawn from a seeded Dirichlet) is fixed, so a model can reach a perplexity far
below uniform and any damage done by compression shows up in the perplexity. Nothing is
downloaded. Attention is written with separate query/key/value/output projections and a per-head
width, so head pruning can remove heads from it.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ = 48, 64


@dataclass
class Cfg:
    vocab: int = VOCAB
    seq: int = SEQ
    dim: int = 64
    heads: int = 4
    layers: int = 2
    mlp: int = 256


class Attention(nn.Module):
    def __init__(self, cfg: Cfg) -> None:
        super().__init__()
        self.n_head = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: Cfg) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, cfg.mlp)
        self.proj = nn.Linear(cfg.mlp, cfg.dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """``forward(tokens)`` -> logits; ``forward(tokens, targets)`` -> mean cross-entropy."""

    def __init__(self, cfg: Cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def hidden_states(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def logits(self, hidden):
        return self.head(self.ln_f(hidden))

    def forward(self, tokens, targets=None):
        logits = self.logits(self.hidden_states(tokens)[-1])
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


REGIMES = 4


@functools.cache
def _tables() -> torch.Tensor:
    """``[REGIMES, VOCAB, VOCAB]`` next-symbol distributions, a few likely successors each."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # Dirichlet sampling takes no generator: seed, then restore the caller's state
    tables = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.1)).sample((REGIMES, VOCAB))
    torch.random.set_rng_state(state)
    return tables


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of the source (tokens, next tokens); the same seed gives the same batch.

    Each sequence draws one of ``REGIMES`` hidden regimes and follows that regime's first-order
    transition table, so predicting well needs the current symbol (the MLP path) and the regime,
    which only the earlier symbols reveal (the attention path).
    """
    tables = _tables()
    g = torch.Generator().manual_seed(10_007 * seed + 3)
    regime = torch.randint(0, REGIMES, (n,), generator=g)
    seq = torch.empty(n, SEQ + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ + 1):
        seq[:, t] = torch.multinomial(tables[regime, seq[:, t - 1]], 1, generator=g)[:, 0]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


TRAIN_SEEDS = range(0, 10_000)
EVAL = [batch(32, 1_000_000 + i) for i in range(2)]
CALIB = [batch(16, 2_000_000 + i)[0] for i in range(4)]


@torch.no_grad()
def perplexity(model: nn.Module, data=None) -> float:
    model.eval()
    losses = [float(model(x, y)) for x, y in (data or EVAL)]
    return math.exp(sum(losses) / len(losses))


def train(model: nn.Module, steps: int, lr: float = 3e-3, bsz: int = 32, first_seed: int = 0, loss_fn=None) -> nn.Module:
    torch.manual_seed(1234)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        x, y = batch(bsz, first_seed + step)
        loss = model(x, y) if loss_fn is None else loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


@functools.cache
def _trained(layers: int, steps: int, bsz: int) -> GPT:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to thread synchronisation
    try:
        torch.manual_seed(0)
        return train(GPT(Cfg(layers=layers)), steps, bsz=bsz)
    finally:
        torch.set_num_threads(threads)


def trained_gpt(layers: int = 2, steps: int = 300, bsz: int = 32) -> GPT:
    """A trained yardstick (trained once per process, a fresh copy per caller)."""
    return copy.deepcopy(_trained(layers, steps, bsz))
