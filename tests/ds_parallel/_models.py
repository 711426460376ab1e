"""Tiny models for the ds-parallel tests: a plain GPT and random Hugging Face models built from configs.

The plain GPT's attention reshapes with ``-1`` heads (``view(b, t, 3, -1, head_dim)``), the one thing
tensor parallelism asks of a model's own code: head counts then follow the sharded width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 64
    seq_len: int = 16
    dim: int = 32
    layers: int = 2
    heads: int = 4


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential()
        self.mlp.up = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.mlp.act = nn.GELU()
        self.mlp.down = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, -1, self.head_dim).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(tokens, targets=None)``: logits, or the mean cross-entropy when targets are given."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or GPTConfig()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**kw))


SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64)


def hf_config(family: str):
    """A tiny random config of ``family`` (dropout off, so training runs are deterministic)."""
    import transformers as t

    configs = {
        "llama": lambda: t.LlamaConfig(**SMALL, num_attention_heads=6, num_key_value_heads=2),
        "llama_kv3": lambda: t.LlamaConfig(**SMALL, num_attention_heads=6, num_key_value_heads=3),
        "llama_kv1": lambda: t.LlamaConfig(**SMALL, num_attention_heads=6, num_key_value_heads=1),
        "mistral": lambda: t.MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2),
        "qwen2": lambda: t.Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2),
        "qwen3": lambda: t.Qwen3Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        "gemma": lambda: t.GemmaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
        "phi3": lambda: t.Phi3Config(**SMALL, num_attention_heads=6, num_key_value_heads=3, pad_token_id=0),
        "gpt2": lambda: t.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "opt": lambda: t.OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                   pad_token_id=1, dropout=0.0),
        "falcon": lambda: t.FalconConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4),
        "falcon_new": lambda: t.FalconConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=1),
        "falcon_alibi": lambda: t.FalconConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, alibi=True, multi_query=False,
                                               parallel_attn=False, bias=True),
        "bloom": lambda: t.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=4),
    }
    cfg = configs[family]()
    cfg._attn_implementation = "eager" if family.startswith(("bloom", "falcon")) else "sdpa"
    return cfg


def hf_model(family: str, seed: int = 0):
    import transformers as t

    torch.manual_seed(seed)
    return t.AutoModelForCausalLM.from_config(hf_config(family)).float()


FAMILIES = ("llama", "llama_kv3", "llama_kv1", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt",
            "falcon", "falcon_new", "falcon_alibi", "bloom")
