"""Models whose forward uses parameters outside the module that owns them (ZeRO-3 "external" parameters).

Each is a tiny causal LM with ``forward(tokens, targets)`` returning the mean cross-entropy, so the
DDP reference loop and the engine loop of ``_train.py`` drive them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._train import CFG

V, T, D, H = CFG.vocab_size, CFG.seq_len, CFG.dim, CFG.heads


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MHABlock(nn.Module):
    """Pre-norm block around ``nn.MultiheadAttention``: its forward passes ``out_proj.weight`` and
    ``out_proj.bias`` to ``F.multi_head_attention_forward`` without ever calling ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.ln2 = nn.LayerNorm(D)
        self.mlp = MLP()

    def forward(self, x):
        mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MHAGPT(nn.Module):
    """GPT of :class:`MHABlock` blocks; the head is tied to the embedding as a module attribute."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.blocks = nn.ModuleList(MHABlock() for _ in range(layers))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens, targets):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))


class ReadByParent(nn.Module):
    """The root reads its children's weights: the output projection is ``tok.weight`` read in the root's
    forward (tying without a module), and the MLP's ``down`` weight is applied by the parent, scaled,
    without calling ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.mlp = MLP()
        self.scale = nn.Parameter(torch.ones(D))

    def forward(self, tokens, targets):
        x = self.tok(tokens)
        h = F.gelu(self.mlp.up(self.ln(x)))
        x = x + F.linear(h, self.mlp.down.weight * 0.5, self.mlp.down.bias) * self.scale
        logits = F.linear(x, self.tok.weight)
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))


class Decoder(nn.Module):
    """Applies a weight it is given (owned by another module) and a bias of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(D))

    def forward(self, x, weight):
        return F.linear(x, weight, self.bias)


class SharedByTwo(nn.Module):
    """``enc.weight`` is used by two modules: by ``enc`` itself and, passed as an argument, by ``dec``,
    a sibling that does not own it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.enc = nn.Linear(D, D)
        self.dec = Decoder()
        self.out = nn.Linear(D, V)

    def forward(self, tokens, targets):
        x = torch.tanh(self.enc(self.emb(tokens)))
        y = torch.tanh(self.dec(x, self.enc.weight))
        logits = self.out(x + y)
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))


MODELS = {"mha": MHAGPT, "parent": ReadByParent, "shared": SharedByTwo}


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]()
