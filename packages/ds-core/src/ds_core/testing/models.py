"""Small reference models used by tests, benchmarks and examples across the ds packages.

``GPT`` is a plain GPT-2-style decoder (Radford et al. 2019): token + position embeddings, pre-norm
blocks of causal self-attention and an MLP, a final LayerNorm, and an output head tied to the token
embedding. Small enough to train on CPU ranks in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT", "Block", "MLP", "synthetic_tokens"]


@dataclass
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 64
    dim: int = 128
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, dropout=cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(tokens, targets=None)`` returns the mean cross-entropy when targets are given."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def synthetic_tokens(batch: int, seq_len: int, vocab: int, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic (step, rank)-keyed batch of a learnable sequence task: tokens and next tokens.

    Sequences follow ``x[t+1] = (a·x[t] + b) mod vocab`` with per-sequence a, b, so the loss can fall
    well below uniform; the same (step, rank) always gives the same batch.
    """
    g = torch.Generator().manual_seed(1_000_003 * step + 7919 * rank + 17)
    a = torch.randint(1, 8, (batch, 1), generator=g)
    b = torch.randint(0, vocab, (batch, 1), generator=g)
    x0 = torch.randint(0, vocab, (batch, 1), generator=g)
    seq = [x0]
    for _ in range(seq_len):
        seq.append((a * seq[-1] + b) % vocab)
    full = torch.cat(seq, dim=1)
    return full[:, :-1].contiguous(), full[:, 1:].contiguous()
