"""The building blocks of the native models: norms, attention, SwiGLU/GELU MLPs and the sparse MoE MLP.

Linear layers are plain ``nn.Linear`` when built; the loader (:mod:`ds_infer.models.loader`)
replaces each with what the checkpoint and the settings call for (a quantized linear, a
tensor-parallel shard, an offloaded one) — every replacement takes ``x [..., in]`` and returns
``[..., out]``, so the blocks never know. Projections are fused where the math allows: one
``qkv_proj`` GEMM for q, k and v and one ``gate_up_proj`` GEMM for the SwiGLU pair, since at decode
time the GEMMs are matrix-vector products bound by launch overhead and weight reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .config import ArchConfig, MoEConfig
from .kv import KVBackend
from .rope import apply_rotary

__all__ = ["RMSNorm", "LayerNorm", "Attention", "GatedMLP", "GeluMLP", "SparseMoE", "activation", "Parallel",
           "RowsLinear", "ROWS_KERNEL_MAX", "DENSE_LINEARS"]

ROWS_KERNEL_MAX = 16  # the most rows of activations ds-ops' decode_linear kernel takes


class Parallel:
    """This rank's share of the model over ``size`` tensor-parallel ranks (1 = everything local).

    The sharding math and the collectives are ds-parallel's (the ``tensor`` axis of training), so a
    native model splits its weights exactly as ``ds_parallel.tensor_parallel`` would: query heads in
    even blocks, grouped-query K/V heads split when they divide ``size`` and otherwise replicated
    (``ds_parallel.shards.KVHeads``: every rank computes the KV heads its query heads read), the
    vocabulary in nearly equal pieces. ``experts``: the experts held here (expert parallelism).
    """

    def __init__(self, rank: int = 0, size: int = 1, group=None, expert_parallel: bool = False) -> None:
        self.rank, self.size, self.group = rank, size, group
        self.expert_parallel = expert_parallel and size > 1
        self.tg = None
        if size > 1:
            from ds_parallel import TensorGroup

            self.tg = TensorGroup(size, rank, group)

    def heads(self, n: int) -> int:
        return n // self.size

    def kv_heads(self, num_heads: int, num_kv: int) -> int:
        """KV heads this rank computes (copies included when they are replicated)."""
        if self.size == 1:
            return num_kv
        from ds_parallel.shards import kv_replication

        return kv_replication(num_heads, num_kv, self.size)[1]

    def kv_rows(self, num_heads: int, num_kv: int, head_dim: int) -> list[slice] | None:
        """Rows of the full K (or V) projection this rank computes, in order (None: all)."""
        if self.size == 1:
            return None
        from ds_parallel import KVHeads

        pieces = KVHeads(num_kv, head_dim, num_heads).pieces(self.size, self.rank)
        return [slice(p.start, p.start + p.length) for p in pieces]

    def block(self, n: int, unit: int = 1) -> slice | None:
        """This rank's even block of ``n`` rows in whole ``unit`` s (None when not sharded)."""
        if self.size == 1:
            return None
        from ds_parallel.shards import even_run

        start, length = even_run(n, self.size, self.rank, unit)
        return slice(start, start + length)

    def vocab(self, n: int) -> tuple[int, ...]:
        """Every rank's share of an ``n``-row vocabulary."""
        if self.size == 1:
            return (n,)
        from ds_parallel.shards import vocab_sizes

        return vocab_sizes(n, self.size)

    def vocab_rows(self, n: int) -> slice | None:
        if self.size == 1:
            return None
        sizes = self.vocab(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def experts(self, n: int) -> range:
        if not self.expert_parallel:
            return range(n)
        per = n // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def reduce(self, t: Tensor) -> Tensor:
        """Sum the partial outputs of row-parallel layers (or expert shards): Megatron's ``g``."""
        if self.size == 1:
            return t
        from ds_parallel import reduce_from_group

        return reduce_from_group(t, self.tg, inplace=True)

    def gather_vocab(self, logits: Tensor, vocab: int) -> Tensor:
        """Every rank's vocabulary slice of the logits, concatenated."""
        if self.size == 1:
            return logits
        from ds_parallel import gather_from_group

        sizes = self.vocab(vocab)
        return gather_from_group(logits, self.tg, sizes if len(set(sizes)) > 1 else None)

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        """The token embedding: ds-parallel's vocabulary-parallel one when sharded."""
        if self.size == 1:
            return nn.Embedding(vocab, hidden)
        from ds_parallel import VocabParallelEmbedding

        return VocabParallelEmbedding(vocab, hidden, group=self.tg)


def activation(name: str):
    name = name.lower()
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_approximate"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"activation {name!r} is not supported; supported: silu, gelu, gelu_new, relu")


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` whose products with at most :data:`ROWS_KERNEL_MAX` rows (decode steps) run
    the op registry's ``ds_ops::decode_linear`` (``_rows_op``, set by
    :meth:`~ds_infer.models.base.CausalLM.use_rows_kernel`); longer inputs (prefill) and anything
    that needs gradients run ``F.linear``. Same parameters, same state dict, same results within
    fp32 rounding.
    """

    _rows_op = None

    def forward(self, x: Tensor) -> Tensor:
        op = self._rows_op
        if (op is None or x.requires_grad or self.weight.requires_grad
                or x.numel() > ROWS_KERNEL_MAX * x.shape[-1]):
            return F.linear(x, self.weight, self.bias)
        return op(x, self.weight, self.bias)


#: the classes of a dense (unquantized, unsharded-by-class) linear layer of a native model
DENSE_LINEARS = (nn.Linear, RowsLinear)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False  # ds-ops kernel through the op registry (replace_with_kernel_inject)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.fused)


class LayerNorm(nn.LayerNorm):
    fused = False

    def forward(self, x: Tensor) -> Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, self.fused)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with rotary (Llama family) or without (GPT-2).

    Holds this rank's ``num_heads`` query and ``num_kv_heads`` kv heads; the attention itself is
    the backend's (``kv.attend``).
    """

    def __init__(self, arch: ArchConfig, layer_idx: int, par: Parallel) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = arch.head_dim
        self.num_heads = par.heads(arch.num_heads)
        self.num_kv_heads = par.kv_heads(arch.num_heads, arch.num_kv_heads)
        self.scale = arch.attn_scales[layer_idx]
        self.window = arch.sliding_windows[layer_idx]
        self.rotary = arch.rope is not None
        self.split = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        self.qkv_proj = nn.Linear(arch.hidden_size, sum(self.split), bias=arch.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, arch.hidden_size, bias=arch.o_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.norm_eps)
            self.k_norm = RMSNorm(d, arch.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, kv: KVBackend) -> Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[..., (nq + nkv) * d:].view(b, t, nkv, d)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm of q and k before the rotation
            q = self.q_norm(qkv[..., : nq * d].view(b, t, nq, d))
            k = self.k_norm(qkv[..., nq * d: (nq + nkv) * d].view(b, t, nkv, d))
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        else:
            qk = qkv[..., : (nq + nkv) * d].view(b, t, nq + nkv, d)
            if rope is not None:  # q and k rotated together: one set of kernels per layer
                qk = apply_rotary(qk, *rope)
            q, k = qk[:, :, :nq], qk[:, :, nq:]
        out = kv.attend(self.layer_idx, q, k, v, scale=self.scale, window=self.window)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (SwiGLU, Shazeer 2020) with gate and up in one GEMM."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's ``c_proj(act(c_fc(x)))``."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(hidden, intermediate)
        self.c_proj = nn.Linear(intermediate, hidden)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral; Qwen-MoE with its gated shared expert).

    Routing (Fedus et al. 2021; Jiang et al. 2024): softmax over the router logits in fp32, keep the
    top ``k``, renormalise them when ``norm_topk_prob``. Experts are two stacked weights,
    ``gate_up [E, 2I, H]`` and ``down [E, H, I]``, of which this rank holds ``experts`` (expert
    parallelism): each rank adds its experts' share for every token and the partial outputs are
    summed across ranks by the caller's all-reduce (every rank sees every token in inference).
    """

    def __init__(self, hidden: int, moe: MoEConfig, act: str, par: Parallel) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = moe.num_experts, moe.top_k, moe.norm_topk_prob
        self.local = experts = par.experts(moe.num_experts)
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)
        # without expert parallelism every rank holds every expert's 1/tp slice of the intermediate
        split = 1 if par.expert_parallel else par.size
        n, inter = len(experts), moe.intermediate_size // split
        self.gate_up = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down = nn.Parameter(torch.empty(n, hidden, inter))
        self.act = activation(act)
        if moe.shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden, moe.shared_intermediate_size // par.size, act)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if moe.shared_gate else None
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights [N, k] in x.dtype, expert ids [N, k])`` for flattened tokens ``x [N, H]``."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def experts_forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Sum over each token's chosen experts held here of ``weight × expert(x)``."""
        out = torch.zeros_like(x)
        first = self.local.start
        local_ids = ids - first
        held = (local_ids >= 0) & (local_ids < len(self.local))
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            # static shapes: every (token, slot) pair gathers its expert's weights (capturable)
            slot_ids = local_ids.clamp(0, len(self.local) - 1).reshape(-1)
            xs = x.repeat_interleave(self.top_k, dim=0)
            gate, up = torch.bmm(self.gate_up[slot_ids], xs[:, :, None]).squeeze(-1).chunk(2, dim=-1)
            h = torch.bmm(self.down[slot_ids], (self.act(gate) * up)[:, :, None]).squeeze(-1)
            w = (weights * held).reshape(-1, 1)
            return (h.float() * w).to(x.dtype).view(-1, self.top_k, x.shape[-1]).sum(dim=1)
        for e in torch.unique(local_ids[held]).tolist():  # CPU: loop over the experts hit, no copies
            token, slot = torch.where(local_ids == e)
            gate, up = F.linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            h = F.linear(self.act(gate) * up, self.down[e])
            out.index_add_(0, token, (h * weights[token, slot, None]).to(x.dtype))
        return out

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.route(flat)
        out = self.experts_forward(flat, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.view(shape)
