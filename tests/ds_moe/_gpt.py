"""A small GPT whose feed-forward layers are MoE layers (ds_core.testing.models pieces), for the tests."""

from __future__ import annotations

import torch
from torch import nn

from ds_core.testing.models import GPT, MLP, GPTConfig
from ds_moe import MoE

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)
AUX_WEIGHT = 0.01


class MoEFFN(nn.Module):
    """Wraps MoE so a Block can call it like its MLP; keeps the last aux loss."""

    def __init__(self, dim: int, **moe) -> None:
        super().__init__()
        self.moe = MoE(dim, MLP(dim, 2 * dim), **moe)
        self.l_aux = torch.zeros(())

    def forward(self, x):
        out, self.l_aux, _ = self.moe(x)
        return out


class MoEGPT(GPT):
    def __init__(self, cfg: GPTConfig = CFG, **moe) -> None:
        super().__init__(cfg)
        for block in self.blocks:
            block.mlp = MoEFFN(cfg.dim, **moe)
        # experts start as copies (DeepSpeed's behaviour); make them differ so routing matters
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if ".experts." in name:
                    expert = int(name.split(".experts.experts.")[1].split(".")[0])
                    p.add_(torch.randn(p.shape, generator=g) * 0.02 * (1 + expert % 3))

    def forward(self, tokens, targets=None):
        out = super().forward(tokens, targets)
        if targets is None:
            return out
        return out + AUX_WEIGHT * sum(b.mlp.l_aux for b in self.blocks)


def make(seed: int = 0, **moe) -> MoEGPT:
    torch.manual_seed(seed)
    return MoEGPT(**moe)
