"""Llama-family decoders: Llama 2/3, Mistral, Qwen2, Qwen3 (q/k RMSNorm), Mixtral and Qwen-MoE.

Pre-norm residual blocks (RMSNorm → grouped-query attention with rotary → RMSNorm → SwiGLU or a
sparse MoE MLP), a final RMSNorm and an (optionally tied) output head. Checkpoint names are those of
``transformers``' ``*ForCausalLM`` classes; the MoE experts load from either layout in use, one
tensor per expert (``experts.N.w1`` / ``experts.N.gate_proj``, what ``save_pretrained`` writes) or
the stacked ``experts.gate_up_proj`` of a model in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import CausalLM
from .config import ArchConfig
from .kv import KVBackend
from .layers import Attention, GatedMLP, Parallel, RMSNorm, SparseMoE
from .loader import Part, WeightLoader
from .rope import Rotary

__all__ = ["LlamaForCausalLM", "DecoderLayer", "load_attention", "load_vocab", "load_head"]


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, idx: int, par: Parallel) -> None:
        super().__init__()
        self.par = par
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.self_attn = Attention(arch, idx, par)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        if arch.moe is not None and arch.moe.sparse_layers[idx]:
            self.mlp: nn.Module = SparseMoE(arch.hidden_size, arch.moe, arch.act, par)
        else:
            self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size // par.size, arch.act, arch.mlp_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, kv: KVBackend) -> Tensor:
        x = x + self.par.reduce(self.self_attn(self.input_layernorm(x), rope, kv))
        return x + self.par.reduce(self.mlp(self.post_attention_layernorm(x)))


class LlamaForCausalLM(CausalLM):
    def __init__(self, arch: ArchConfig, par: Parallel | None = None) -> None:
        super().__init__(arch, par)
        par = self.par
        self.model = nn.Module()
        self.model.embed_tokens = par.embedding(arch.vocab_size, arch.hidden_size)  # vocabulary-parallel
        self.model.layers = nn.ModuleList(DecoderLayer(arch, i, par) for i in range(arch.num_layers))
        self.model.norm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, par.vocab(arch.vocab_size)[par.rank], bias=False)
        self.rotary = Rotary(arch.rope)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(self, input_ids: Tensor, positions: Tensor, kv: KVBackend) -> Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, kv)
        return self.model.norm(x)

    def load_weights(self, w: WeightLoader) -> None:
        a, par = self.arch, self.par
        h = a.hidden_size
        load_vocab(w, par, "model.embed_tokens.weight", "model.embed_tokens.weight", a.vocab_size, h)
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}"
            w.param(f"{p}.input_layernorm.weight", f"{p}.input_layernorm.weight", (h,))
            w.param(f"{p}.post_attention_layernorm.weight", f"{p}.post_attention_layernorm.weight", (h,))
            load_attention(w, a, par, f"{p}.self_attn", f"{p}.self_attn")
            if isinstance(layer.mlp, SparseMoE):
                load_moe(w, a, par, f"{p}.mlp", p, layer.mlp)
            else:
                load_gated_mlp(w, par, f"{p}.mlp", f"{p}.mlp", h, a.intermediate_size, a.mlp_bias)
        w.param("model.norm.weight", "model.norm.weight", (h,))
        load_head(w, par, a, "lm_head", self.model.embed_tokens)


def load_vocab(w: WeightLoader, par: Parallel, path: str, names, vocab: int, hidden: int) -> None:
    """This rank's vocabulary rows of an embedding (ds-parallel's nearly equal pieces)."""
    w.param(path, names, (vocab, hidden), par.vocab_rows(vocab))


def load_head(w: WeightLoader, par: Parallel, a: ArchConfig, path: str, embedding: nn.Module) -> None:
    """The output head: this rank's vocabulary rows, or the embedding's weight when tied."""
    if a.tie_word_embeddings or not (w.has(f"{path}.weight") or w.has(f"{path}.qweight")):
        if not a.tie_word_embeddings:
            w.resolve(f"{path}.weight")  # raises: an untied head must be in the checkpoint
        if not w.check:
            w.model.get_submodule(path).weight = embedding.weight
        return
    w.linear(path, [Part(path, a.vocab_size, par.vocab_rows(a.vocab_size))], a.hidden_size)


def load_attention(w: WeightLoader, a: ArchConfig, par: Parallel, path: str, src: str) -> None:
    d = a.head_dim
    q_rows = par.block(a.num_heads * d, d)  # whole query heads
    kv_rows = par.kv_rows(a.num_heads, a.num_kv_heads, d)  # split, or the replicated heads it reads
    parts = [Part(f"{src}.q_proj", a.num_heads * d, q_rows), Part(f"{src}.k_proj", a.num_kv_heads * d, kv_rows),
             Part(f"{src}.v_proj", a.num_kv_heads * d, kv_rows)]
    w.linear(f"{path}.qkv_proj", parts, a.hidden_size, bias=a.qkv_bias)
    w.linear(f"{path}.o_proj", [Part(f"{src}.o_proj", a.hidden_size)], a.num_heads * d, cols=q_rows,
             bias=a.o_bias, row_parallel=par.size > 1)
    if a.qk_norm:
        w.param(f"{path}.q_norm.weight", f"{src}.q_norm.weight", (d,))
        w.param(f"{path}.k_norm.weight", f"{src}.k_norm.weight", (d,))


def load_gated_mlp(w: WeightLoader, par: Parallel, path: str, src: str, hidden: int, inter: int,
                   bias: bool = False) -> None:
    rows = par.block(inter)
    w.linear(f"{path}.gate_up_proj", [Part(f"{src}.gate_proj", inter, rows), Part(f"{src}.up_proj", inter, rows)],
             hidden, bias=bias)
    w.linear(f"{path}.down_proj", [Part(f"{src}.down_proj", hidden)], inter, cols=rows, bias=bias,
             row_parallel=par.size > 1)


def load_moe(w: WeightLoader, a: ArchConfig, par: Parallel, path: str, layer_src: str, moe: SparseMoE) -> None:
    h, inter, n = a.hidden_size, a.moe.intermediate_size, a.moe.num_experts
    bases = [f"{layer_src}.block_sparse_moe", f"{layer_src}.mlp"]
    w.param(f"{path}.gate.weight", [f"{b}.gate.weight" for b in bases], (n, h))
    names = [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")]
    # expert parallel: whole experts per rank; otherwise every expert's intermediate split over ranks
    rows = None if par.expert_parallel else par.block(inter)
    gate_up, down = [], []
    for e in moe.local:
        per_expert = [(f"{b}.experts.{e}.{g}.weight", f"{b}.experts.{e}.{u}.weight", f"{b}.experts.{e}.{dn}.weight")
                      for b in bases for g, u, dn in names]
        found = next((t for t in per_expert if w.has(t[0])), None)
        if found is not None:
            g = w.tensor(found[0], (inter, h), rows)
            u = w.tensor(found[1], (inter, h), rows)
            gate_up.append(torch.cat([g, u]))
            down.append(w.tensor(found[2], (h, inter), None, rows))
        else:  # stacked experts of an in-memory transformers model: [E, 2I, H] and [E, H, I]
            stacked = [f"{b}.experts.gate_up_proj" for b in bases]
            gu = w.tensor(stacked, (n, 2 * inter, h), slice(e, e + 1))[0]
            dn = w.tensor([f"{b}.experts.down_proj" for b in bases], (n, h, inter), slice(e, e + 1))[0]
            if rows is not None:
                gu = torch.cat([gu[rows], gu[inter:][rows]])
                dn = dn[:, rows]
            gate_up.append(gu)
            down.append(dn)
    if not w.check:
        from .loader import set_param

        set_param(w.model, f"{path}.gate_up", torch.stack(gate_up))
        set_param(w.model, f"{path}.down", torch.stack(down))
    if a.moe.shared_intermediate_size:
        # the shared expert is a dense SwiGLU: sharded like any MLP, summed by the same all-reduce
        load_gated_mlp(w, par, f"{path}.shared_expert", f"{layer_src}.mlp.shared_expert", h,
                       a.moe.shared_intermediate_size)
        if a.moe.shared_gate:
            w.linear(f"{path}.shared_expert_gate", [Part(f"{layer_src}.mlp.shared_expert_gate", 1)], h)
