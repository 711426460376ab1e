"""The base class of every native causal LM: forward over explicit positions, logits on demand."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ArchConfig
from .kv import KVBackend, KVSpec, NoCache
from .layers import DENSE_LINEARS, Parallel, RowsLinear

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

    def store_weights_transposed(self) -> int:
        """Keep every dense ``nn.Linear`` weight of this CPU model as the transpose of a contiguous
        ``[in, out]`` tensor; returns how many were changed (0 when already done: idempotent).

        [Note: transposed weight storage] ``F.linear(x, w)`` multiplies by ``w.t()``. With ``w``
        stored ``[out, in]`` row-major (PyTorch's layout), the CPU BLAS reads the weight as a
        transposed operand; stored ``[in, out]`` it reads it as a plain one, which for the few rows
        of a decode step (1 to 16) runs 1.2-1.7x faster on the measured machine — those GEMMs are
        most of a decode step. The weight keeps its shape ``[out, in]`` and its values (only the
        strides change), so every reader (the loader, export, tensor-parallel code) still sees the
        same tensor; export writes ``.contiguous()`` copies. Products of 8 or more rows are
        bit-identical either way; a 1-row product (matrix-vector) sums in another order, within
        fp32 rounding (~1e-6 relative). Quantized and sharded linears are other classes, untouched,
        and weights streamed by ZeRO-Inference are rebound to their buffers at each forward.
        """
        changed = 0
        for m in self.modules():
            w = getattr(m, "weight", None) if type(m) is nn.Linear else None
            if (w is None or w.device.type != "cpu" or not w.is_floating_point() or w.dim() != 2
                    or w.numel() == 0 or min(w.shape) == 1 or not w.is_contiguous()):
                continue
            w.data = w.data.t().contiguous().t()
            changed += 1
        return changed

    def use_rows_kernel(self) -> int:
        """Run the few-row products of this CPU model's dense fp32 linears through the op registry's
        ``ds_ops::decode_linear`` (each ``nn.Linear`` becomes a :class:`~.layers.RowsLinear`, same
        parameters); returns how many linears run it, 0 when the op is not installed. Idempotent.

        [Note: few-row products] A decode step's GEMMs have 1 to 16 rows and are most of its time. A
        BLAS GEMM packs panels of the weight before multiplying, which for 8 rows costs about as much
        as the product; ds-ops' kernel reads each weight row once where it lies, every activation row
        meeting it in L1 (measured in docs/inference.md). Without the op, the decoder falls back to
        :meth:`store_weights_transposed`, the faster layout for the BLAS.
        """
        from ds_core.ops import get_op

        op = get_op("decode_linear")
        if op is None:
            return 0
        op(torch.zeros(1, 1), torch.zeros(1, 1), None)  # a first CPU call builds the kernel: here, not mid-decode
        count = 0
        for m in self.modules():
            w = getattr(m, "weight", None) if type(m) in DENSE_LINEARS else None
            if (w is None or w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2
                    or not w.is_contiguous()):
                continue
            m.__class__ = RowsLinear
            m._rows_op = op
            count += 1
        return count

    def set_fused(self, enabled: bool) -> None:
        """Norms through the op registry's kernels where one exists for the device."""
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = bool(enabled)

    def extra_repr(self) -> str:
        a = self.arch
        tp = f", tp={self.par.size}" if self.par.size > 1 else ""
        return f"model_type={a.model_type}, layers={a.num_layers}, hidden={a.hidden_size}{tp}"
