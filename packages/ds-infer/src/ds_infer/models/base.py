"""The base class of every native causal LM: forward over explicit positions, logits on demand."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ArchConfig
from .kv import KVBackend, KVSpec, NoCache
from .layers import Parallel

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """``forward(input_ids, positions, kv) -> hidden``; ``compute_logits(hidden, rows) -> logits``.

    Subclasses build their layers in ``__init__`` (on the meta device, see the loader) and fill them
    in ``load_weights(loader)``.
    """

    #: read by :func:`ds_infer.generate` to pick the static-KV-cache decoder (no import of this class there)
    ds_native_decoder = True

    arch: ArchConfig
    par: Parallel

    def __init__(self, arch: ArchConfig, par: Parallel | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.par = par or Parallel()

    # -- the contract --------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, positions: Tensor, kv: KVBackend) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def compute_logits(self, hidden: Tensor, rows: Tensor | None = None) -> Tensor:
        """fp32 logits ``[N, vocab]`` for the flattened rows ``rows`` of ``hidden`` (all when None)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if rows is not None:
            flat = flat.index_select(0, rows.to(flat.device))
        logits = self.lm_head(flat)
        # vocabulary-parallel head: every rank gathers the full vocabulary
        return self.par.gather_vocab(logits, self.arch.vocab_size).float()

    def kv_spec(self, dtype: torch.dtype | None = None) -> KVSpec:
        """Shape of the keys/values this rank keeps per token (for a cache of any kind)."""
        attn = self.attention_layers()
        first = attn[0]
        return KVSpec(num_layers=len(attn), num_kv_heads=first.num_kv_heads, head_dim=first.head_dim,
                      dtype=dtype or self.dtype, device=self.device,
                      sliding_windows=tuple(a.window for a in attn))

    # -- conveniences --------------------------------------------------------------------------

    def attention_layers(self) -> list[nn.Module]:
        from .layers import Attention

        return [m for m in self.modules() if isinstance(m, Attention)]

    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    @torch.inference_mode()
    def score(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` for whole sequences (no cache); left padding allowed."""
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden = self.forward(input_ids, positions, NoCache(attention_mask))
        return self.compute_logits(hidden).view(*input_ids.shape, -1)

    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs) -> Tensor:
        """ds_infer's decode loop on this model (see :func:`ds_infer.generate`)."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def set_fused(self, enabled: bool) -> None:
        """Norms through the op registry's kernels where one exists for the device."""
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = bool(enabled)

    def extra_repr(self) -> str:
        a = self.arch
        tp = f", tp={self.par.size}" if self.par.size > 1 else ""
        return f"model_type={a.model_type}, layers={a.num_layers}, hidden={a.hidden_size}{tp}"
