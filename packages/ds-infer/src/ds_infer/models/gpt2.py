"""GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, GELU MLP, tied head.

Loads ``transformers``' ``GPT2LMHeadModel`` checkpoints (``Conv1D`` weights stored ``[in, out]``,
transposed on load) and, through :func:`ds_gpt_names`, the plain ``ds_core.testing.models.GPT`` the
examples train (same architecture, ``nn.Linear`` weights, exact GELU).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import CausalLM
from .config import ArchConfig
from .kv import KVBackend
from .layers import Attention, GeluMLP, LayerNorm, Parallel
from .llama import load_head, load_vocab
from .loader import Part, WeightLoader

__all__ = ["GPT2LMHeadModel", "GPT2Block", "ds_gpt_names"]


class GPT2Block(nn.Module):
    def __init__(self, arch: ArchConfig, idx: int, par: Parallel) -> None:
        super().__init__()
        self.par = par
        self.ln_1 = LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.attn = Attention(arch, idx, par)
        self.ln_2 = LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.mlp = GeluMLP(arch.hidden_size, arch.intermediate_size // par.size, arch.act)

    def forward(self, x: Tensor, rope, kv: KVBackend) -> Tensor:
        x = x + self.par.reduce(self.attn(self.ln_1(x), None, kv))
        return x + self.par.reduce(self.mlp(self.ln_2(x)))


class GPT2LMHeadModel(CausalLM):
    def __init__(self, arch: ArchConfig, par: Parallel | None = None) -> None:
        super().__init__(arch, par)
        par = self.par
        self.transformer = nn.Module()
        self.transformer.wte = par.embedding(arch.vocab_size, arch.hidden_size)
        self.transformer.wpe = nn.Embedding(arch.max_position_embeddings, arch.hidden_size)
        self.transformer.h = nn.ModuleList(GPT2Block(arch, i, par) for i in range(arch.num_layers))
        self.transformer.ln_f = LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, par.vocab(arch.vocab_size)[par.rank], bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def forward(self, input_ids: Tensor, positions: Tensor, kv: KVBackend) -> Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block in t.h:
            x = block(x, None, kv)
        return t.ln_f(x)

    def load_weights(self, w: WeightLoader) -> None:
        a, par = self.arch, self.par
        h, inter = a.hidden_size, a.intermediate_size
        conv = a.model_type == "gpt2"  # transformers' Conv1D stores [in, out]
        pre = "transformer." if w.has("transformer.wte.weight") else ""
        load_vocab(w, par, "transformer.wte.weight", f"{pre}wte.weight", a.vocab_size, h)
        w.param("transformer.wpe.weight", f"{pre}wpe.weight", (a.max_position_embeddings, h))
        heads = par.block(h, a.head_dim)  # this rank's heads (no GQA in GPT-2)
        for i in range(a.num_layers):
            src, dst = f"{pre}h.{i}", f"transformer.h.{i}"
            for ln in ("ln_1", "ln_2"):
                w.param(f"{dst}.{ln}.weight", f"{src}.{ln}.weight", (h,))
                w.param(f"{dst}.{ln}.bias", f"{src}.{ln}.bias", (h,))
            if par.size == 1:
                parts = [Part(f"{src}.attn.c_attn", 3 * h)]
            else:  # q, k and v are consecutive blocks of c_attn's outputs: take this rank's heads of each
                parts = [Part(f"{src}.attn.c_attn", 3 * h, slice(j * h + heads.start, j * h + heads.stop))
                         for j in range(3)]
            w.linear(f"{dst}.attn.qkv_proj", parts, h, bias=True, transpose=conv)
            w.linear(f"{dst}.attn.o_proj", [Part(f"{src}.attn.c_proj", h)], h, cols=heads, bias=True,
                     row_parallel=par.size > 1, transpose=conv)
            rows = par.block(inter)
            w.linear(f"{dst}.mlp.c_fc", [Part(f"{src}.mlp.c_fc", inter, rows)], h, bias=True, transpose=conv)
            w.linear(f"{dst}.mlp.c_proj", [Part(f"{src}.mlp.c_proj", h)], inter, cols=rows, bias=True,
                     row_parallel=par.size > 1, transpose=conv)
        w.param("transformer.ln_f.weight", f"{pre}ln_f.weight", (h,))
        w.param("transformer.ln_f.bias", f"{pre}ln_f.bias", (h,))
        load_head(w, par, a, "lm_head", self.transformer.wte)


def ds_gpt_names(name: str) -> str | None:
    """``ds_core.testing.models.GPT`` state-dict name -> the GPT-2 name this loader reads."""
    name = name.replace("tok.weight", "wte.weight").replace("pos.weight", "wpe.weight")
    if name.startswith("head."):
        return "lm_head." + name[len("head."):]
    name = name.replace("blocks.", "h.").replace(".ln1.", ".ln_1.").replace(".ln2.", ".ln_2.")
    name = name.replace(".qkv.", ".attn.c_attn.").replace(".proj.", ".attn.c_proj.")
    name = name.replace(".mlp.up.", ".mlp.c_fc.").replace(".mlp.down.", ".mlp.c_proj.")
    return name
