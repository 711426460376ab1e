"""What the loader builds for each linear, given the ``quant`` setting.

``quant`` (``load_model(..., quant=...)``, ``init_inference(..., quant=...)``):

- ``None``: dense layers stay ``nn.Linear``; a ds-quant checkpoint's layers become ``QuantLinear``;
- ``"int8"`` / ``"int4"`` or ``{"bits": 8|4, "group_size": 128, "symmetric": true}``: weight-only
  round-to-nearest quantization while loading (packed codes, group-wise scales);
- ``{"backend": "bnb", "type": "int8" | "nf4" | "fp4"}``: bitsandbytes' ``Linear8bitLt`` /
  ``Linear4bit`` (needs ``pip install bitsandbytes``).

The output head, MoE routers and the shared-expert gate stay dense: they are small and their
errors move the argmax directly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ds_core.errors import ConfigError

from ..models.loader import LinearFactory

__all__ = ["QuantSpec", "parse_quant", "factory_for", "RTNFactory", "BnbFactory", "KEEP_DENSE"]

KEEP_DENSE = ("lm_head", ".gate", "shared_expert_gate")


class QuantSpec(dict):
    """A normalised ``quant`` setting: backend, bits/type, group_size, symmetric."""


def parse_quant(quant: Any) -> QuantSpec | None:
    if quant in (None, False, "none", "fp", {}):
        return None
    if isinstance(quant, str):
        key = quant.lower()
        if key in ("int8", "int4"):
            return QuantSpec(backend="ds", bits=int(key[3:]), group_size=128 if key == "int4" else -1,
                             symmetric=True)
        if key in ("bnb-int8", "bnb_int8", "nf4", "fp4", "bnb-nf4", "bnb_nf4"):
            return QuantSpec(backend="bnb", type=key.split("-")[-1].split("_")[-1])
        raise ConfigError(f"quant {quant!r} is not a quantization setting; use 'int8', 'int4', 'nf4', 'bnb-int8' "
                          "or a dict like {'bits': 4, 'group_size': 64}")
    if isinstance(quant, dict):
        q = dict(quant)
        if q.pop("enabled", True) is False:
            return None
        backend = q.pop("backend", "ds")
        if backend == "bnb":
            kind = str(q.pop("type", "int8")).lower()
            if kind not in ("int8", "nf4", "fp4"):
                raise ConfigError(f"quant type {kind!r} is not a bitsandbytes type; use int8, nf4 or fp4")
            return QuantSpec(backend="bnb", type=kind, **q)
        if backend != "ds":
            raise ConfigError(f"quant backend {backend!r} is unknown; use 'ds' (packed int8/int4) or 'bnb'")
        weight = q.pop("weight", {}) or {}  # DeepSpeed's {"weight": {"num_bits": 8, ...}} spelling
        bits = int(q.pop("bits", weight.get("num_bits", 8)))
        group = int(q.pop("group_size", weight.get("group_size", 128 if bits == 4 else -1)))
        symmetric = bool(q.pop("symmetric", weight.get("symmetric", True)))
        if q:
            raise ConfigError(f"quant keys {sorted(q)} are not known; use bits, group_size, symmetric, backend")
        if bits not in (4, 8):
            raise ConfigError(f"quant bits {bits} is not supported for quantize-on-load; use 8 or 4 (2- and "
                              "1-bit codes load from a ds-quant checkpoint made by ds-compress)")
        if group != -1 and group <= 0:
            raise ConfigError(f"quant group_size {group} must be positive or -1 (one group per row)")
        return QuantSpec(backend="ds", bits=bits, group_size=group, symmetric=symmetric)
    raise ConfigError(f"quant {quant!r} must be None, a string or a dict")


def _keep_dense(path: str) -> bool:
    return path.endswith(KEEP_DENSE)


class RTNFactory(LinearFactory):
    """Quantize every dense linear (but :data:`KEEP_DENSE`) with round-to-nearest while loading."""

    def __init__(self, bits: int, group_size: int, symmetric: bool) -> None:
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    def dense(self, path: str, weight: Tensor, bias: Tensor | None) -> nn.Module:
        if _keep_dense(path):
            return super().dense(path, weight, bias)
        from .linear import QuantLinear

        cols = weight.shape[1]
        group = self.group_size if self.group_size != -1 and cols % self.group_size == 0 else -1
        if self.bits < 8 and (cols * self.bits) % 8:
            return super().dense(path, weight, bias)
        return QuantLinear.from_dense(weight, bias, self.bits, group, self.symmetric)


class BnbFactory(LinearFactory):
    """bitsandbytes int8 (LLM.int8(), Dettmers et al. 2022) or 4-bit NF4/FP4 (QLoRA) layers."""

    def __init__(self, kind: str, **options: Any) -> None:
        try:
            import bitsandbytes as bnb
        except Exception as exc:
            raise ConfigError(f"quant backend 'bnb' needs bitsandbytes, which does not import here ({exc}); "
                              "`pip install bitsandbytes` or use quant='int8' / 'int4'") from exc
        self.bnb, self.kind, self.options = bnb, kind, options

    def dense(self, path: str, weight: Tensor, bias: Tensor | None) -> nn.Module:
        if _keep_dense(path):
            return super().dense(path, weight, bias)
        bnb = self.bnb
        out, cols = weight.shape
        if self.kind == "int8":
            layer = bnb.nn.Linear8bitLt(cols, out, bias=bias is not None, has_fp16_weights=False,
                                        threshold=float(self.options.get("threshold", 6.0)), device="cpu")
            layer.weight = bnb.nn.Int8Params(weight.detach().cpu().contiguous(), requires_grad=False,
                                             has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(cols, out, bias=bias is not None, compute_dtype=weight.dtype,
                                      quant_type=self.kind, device="cpu")
            layer.weight = bnb.nn.Params4bit(weight.detach().cpu().contiguous(), requires_grad=False,
                                             quant_type=self.kind)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().cpu(), requires_grad=False)
        return layer.to(weight.device)


def factory_for(quant: Any, checkpoint_quantized: bool = False) -> LinearFactory:
    spec = parse_quant(quant)
    if spec is None:
        return LinearFactory()
    if checkpoint_quantized:
        raise ConfigError(f"quant={quant!r} asks to quantize while loading, but the checkpoint is already "
                          "quantized (it has ds_quant.json); drop quant= to load its codes as they are")
    if spec["backend"] == "bnb":
        options = {k: v for k, v in spec.items() if k not in ("backend", "type")}
        return BnbFactory(spec["type"], **options)
    return RTNFactory(spec["bits"], spec["group_size"], spec["symmetric"])
