"""Compression-aware layers: what ``init_compression`` puts in place of ``nn.Linear`` / ``nn.Conv2d``.

A :class:`CompressedLinear` keeps the original parameters (the same ``Parameter`` objects, so an
optimizer built before or after sees them) and applies, in its forward and only while the schedule
has switched them on:

1. weight fake-quantization by the shared group-wise quantizer (straight-through gradient), at the
   scheduled bit width, optionally blended with the fp weight (``fp16_mixed_quantize``);
2. the sparse mask (``sparse_pruning``), the row mask (``row_pruning``, rows = output features and
   their bias), the head mask (``head_pruning``: the input columns of an attention output projection,
   one block per head);
3. activation fake-quantization of the input (per token, or a static momentum range).

``fix()`` (called by ``redundancy_clean``) bakes each technique into the weights; structured masks
then shrink the tensors (:meth:`keep_rows`, :meth:`keep_columns`). :class:`CompressedConv2d` does the
same for convolutions, with output channels in place of rows (``channel_pruning``).

[Note: masks are buffers, scores are parameters] Every mask, score and range is created by
``init_compression`` (before an engine or optimizer exists) and saved in the state dict, so ZeRO's
flat buffers include the scores, checkpoints resume with the masks, and nothing appears mid-run.
Masks are computed from weights that are identical on every data-parallel rank, so they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import pruning
from .errors import CompressionError
from .quantizer import (
    QuantizedWeight,
    QuantSpec,
    compute_qparams,
    decode,
    encode,
    fake_quantize,
    fake_quantize_activation,
)

__all__ = ["CompressedLinear", "CompressedConv2d", "quant_layout", "moq_bits"]

ACT_MOMENTUM = 0.95  # DeepSpeed's momentum for static activation ranges


def quant_layout(out: int, inp: int, quantize_groups: int, name: str) -> tuple[int, int]:
    """(group_size, row_block) that realise DeepSpeed's ``quantize_groups`` on an ``[out, in]`` weight."""
    n = quantize_groups
    if n <= out and out % n == 0:
        return -1, out // n
    if n % out == 0 and inp % (n // out) == 0:
        return inp // (n // out), 1
    raise CompressionError(
        f"weight_quantization: quantize_groups={n} does not fit layer {name!r} ([{out}, {inp}]): it must "
        f"divide the {out} rows, or be a multiple of them whose quotient divides the {inp} inputs")


def moq_bits(start: int, target: int, period: int, steps: int) -> tuple[int, int]:
    """Bits after ``steps`` steps of the MoQ schedule (one bit less at ``period``, ``2*period``,
    ``4*period``, ...), and the step of the last reduction."""
    bits, boundary, last = start, period, 0
    while bits > target and steps >= boundary:
        bits, last, boundary = bits - 1, boundary, boundary * 2
    return bits, last


class _Compressed:
    """State and behaviour shared by the linear and the convolution."""

    row_method = "row_pruning"  # whose schedule_offset switches the row (output channel) mask on

    def _init_compression_state(self) -> None:
        self.wq: dict | None = None          # weight quantization settings
        self.wq_bits: int | None = None      # bits in force now (None: off)
        self.wq_mix = 1.0                    # quantized share of the weight (fp16_mixed_quantize)
        self.aq: dict | None = None          # activation quantization settings
        self.aq_on = False
        self.sparse: dict | None = None
        self.sparse_on = False
        self.row: dict | None = None         # rows (linear) / output channels (conv)
        self.row_on = False
        self.head: dict | None = None
        self.head_on = False
        self.fixed_quant: QuantSpec | None = None  # after fix(): the weight is on this grid
        self.bn_hooks: list = []                 # channel pruning: hooks masking a related BatchNorm

    # -- the 2-D view every technique works on ------------------------------------------------
    def _matrix(self, w: Tensor) -> Tensor:
        return w.reshape(w.shape[0], -1)

    # -- enabling (init_compression) -----------------------------------------------------------
    def enable_weight_quantization(self, start_bits, target_bits, period, symmetric, stochastic,
                                   quantize_groups, mixed_ratio, name) -> None:
        out, inp = self._matrix(self.weight).shape
        group_size, row_block = quant_layout(out, inp, quantize_groups, name)
        if target_bits == 1 and not symmetric:
            raise CompressionError(f"weight_quantization: layer {name!r} targets 1 bit, which is symmetric by "
                                   f"definition; set quantization_type 'symmetric'")
        self.wq = {"start_bits": start_bits, "target_bits": target_bits, "period": period,
                   "symmetric": symmetric, "stochastic": stochastic, "group_size": group_size,
                   "row_block": row_block, "mixed_ratio": mixed_ratio}

    def enable_activation_quantization(self, bits, symmetric, static) -> None:
        self.aq = {"bits": bits, "symmetric": symmetric, "static": static}
        self.register_buffer("act_range", torch.zeros(2, device=self.weight.device))

    def enable_sparse_pruning(self, dense_ratio, method, block_pattern="4x1") -> None:
        self.sparse = {"ratio": dense_ratio, "method": method, "pattern": block_pattern}
        w = self.weight.detach()
        self.register_buffer("sparse_mask", torch.ones_like(w))
        self.register_buffer("sparse_ready", torch.zeros((), dtype=torch.bool, device=w.device))
        if method == "topk":
            self.sparse_scores = nn.Parameter(w.abs().clone())
        if method == "snip_momentum":
            self.register_buffer("snip_score", torch.zeros_like(w, dtype=torch.float32))
            self.register_buffer("snip_step", torch.full((), -1, dtype=torch.long, device=w.device))

    def enable_row_pruning(self, dense_ratio, method) -> None:
        self.row = {"ratio": dense_ratio, "method": method}
        importance = self._matrix(self.weight.detach()).abs().sum(1)
        self.register_buffer("row_mask", torch.ones_like(importance))
        self.register_buffer("row_ready", torch.zeros((), dtype=torch.bool, device=importance.device))
        if method == "topk":
            self.row_scores = nn.Parameter(importance.clone())

    def weight_quant_spec(self) -> QuantSpec | None:
        if self.wq is None:
            return None
        bits = self.wq_bits if self.wq_bits is not None else self.wq["target_bits"]
        return QuantSpec(bits, self.wq["group_size"], self.wq["symmetric"])

    # -- the schedule (CompressionScheduler calls this with the global step) -------------------
    def set_step(self, step: int, offsets: dict[str, int], sparse_end: int | None = None,
                 sparse_stride: int = 1) -> None:
        if self.wq is not None and step >= offsets["weight_quantization"]:
            since = step - offsets["weight_quantization"]
            self.wq_bits, last = moq_bits(self.wq["start_bits"], self.wq["target_bits"], self.wq["period"], since)
            ratio = self.wq["mixed_ratio"]
            self.wq_mix = 1.0 if ratio is None else min(1.0, ratio * (since - last + 1))
        if self.aq is not None:
            self.aq_on = step >= offsets["activation_quantization"]
        if self.sparse is not None and step >= offsets["sparse_pruning"]:
            self._update_sparse(step, offsets["sparse_pruning"], sparse_end, sparse_stride)
            self.sparse_on = True
        if self.row is not None and step >= offsets[self.row_method]:
            if self.row["method"] == "l1" and not bool(self.row_ready):
                self.row_mask.copy_(pruning.topk_mask(self._matrix(self.weight.detach()).abs().sum(1), self.row["ratio"]))
                self.row_ready.fill_(True)
            self.row_on = True
        if self.head is not None and step >= offsets["head_pruning"]:
            if self.head["method"] == "l1" and not bool(self.head_ready):
                self.head_mask.copy_(pruning.topk_mask(self._head_importance(), self.head["ratio"]))
                self.head_ready.fill_(True)
            self.head_on = True

    def _update_sparse(self, step, start, end, stride) -> None:
        method = self.sparse["method"]
        if method == "l1" and not bool(self.sparse_ready):
            self.sparse_mask.copy_(pruning.topk_mask(self.weight.detach().abs(), self.sparse["ratio"]))
            self.sparse_ready.fill_(True)
        elif method == "snip_momentum":
            end = start if end is None else end
            due = step <= end and (step - start) % stride == 0
            if due and int(self.snip_step) != step:
                density = pruning.cubic_density(step, start, end, self.sparse["ratio"])
                score = self.snip_score.clone()
                from ds_core import comm  # the score comes from local gradients: average it over ranks

                if comm.is_initialized() and comm.get_world_size() > 1:
                    comm.all_reduce(score)
                    score /= comm.get_world_size()
                if float(score.abs().sum()) == 0.0:  # no gradient seen yet: start from magnitude
                    score = self.weight.detach().abs().float()
                m = pruning.block_mask(self._matrix(score), self.sparse["pattern"], density)
                self.sparse_mask.copy_(m.view_as(self.weight))
                self.snip_step.fill_(step)

    # -- the masks in force ---------------------------------------------------------------------
    def _sparse_mask_now(self) -> Tensor:
        if self.sparse["method"] == "topk":
            return pruning.TopKBinarizer.apply(self.sparse_scores, self.sparse["ratio"])
        return self.sparse_mask

    def _row_mask_now(self) -> Tensor:
        if self.row["method"] == "topk":
            return pruning.TopKBinarizer.apply(self.row_scores, self.row["ratio"])
        return self.row_mask

    def _quantized_weight(self, w: Tensor) -> Tensor:
        spec = QuantSpec(self.wq_bits, self.wq["group_size"], self.wq["symmetric"])
        shape = w.shape
        q = fake_quantize(self._matrix(w), spec, stochastic=self.wq["stochastic"] and self.training,
                          row_block=self.wq["row_block"]).reshape(shape)
        return q if self.wq_mix >= 1.0 else self.wq_mix * q + (1.0 - self.wq_mix) * w

    def _snip_hook(self, w_eff: Tensor) -> None:
        if self.sparse is None or self.sparse["method"] != "snip_momentum" or not w_eff.requires_grad:
            return
        weight = self.weight.detach()

        def accumulate(grad: Tensor) -> None:
            self.snip_score.mul_(0.9).add_((weight * grad).abs().float(), alpha=0.1)

        w_eff.register_hook(accumulate)

    def _weight_bias(self) -> tuple[Tensor, Tensor | None]:
        w, b = self.weight, self.bias
        if self.wq is not None and self.wq_bits is not None:
            w = self._quantized_weight(w)
        if self.sparse is not None and self.sparse_on:
            w = w * self._sparse_mask_now()
        if self.row is not None and self.row_on:
            m = self._row_mask_now()
            w = w * m.view(-1, *([1] * (w.dim() - 1)))
            b = b * m if b is not None else None
        if self.head is not None and self.head_on:
            w = w * self._head_mask_now().repeat_interleave(w.shape[1] // self.head["num_heads"])[None, :]
        if self.training and self.sparse is not None:
            self._snip_hook(w)  # snip_momentum scores accumulate from the first step
        return w, b

    def _quantize_input(self, x: Tensor) -> Tensor:
        if self.aq is None or not self.aq_on:
            return x
        if not self.aq["static"]:
            return fake_quantize_activation(x, self.aq["bits"], self.aq["symmetric"])
        if self.training:
            lo, hi = x.detach().min().float(), x.detach().max().float()
            if bool(self.act_range[0] == self.act_range[1]):
                self.act_range.copy_(torch.stack([lo, hi]))
            self.act_range.mul_(ACT_MOMENTUM).add_(torch.stack([lo, hi]), alpha=1 - ACT_MOMENTUM)
        return fake_quantize_activation(x, self.aq["bits"], self.aq["symmetric"], (self.act_range[0], self.act_range[1]))

    def effective_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the forward uses now (eval mode: no stochastic rounding)."""
        was = self.training
        self.training = False
        try:
            with torch.no_grad():
                w, b = self._weight_bias()
        finally:
            self.training = was
        return w.detach(), (b.detach() if b is not None else None)

    # -- redundancy_clean -----------------------------------------------------------------------
    def fix(self) -> None:
        """Bake quantization and masks into the weights (DeepSpeed's order: weights are quantized,
        then masked); the structured masks stay available for :meth:`kept_rows`/`kept_heads`."""
        with torch.no_grad():
            if self.wq is not None:
                self.wq_bits = self.wq["target_bits"]
                self.wq_mix = 1.0
                w = self._matrix(self.weight)
                spec = QuantSpec(self.wq_bits, self.wq["group_size"], self.wq["symmetric"])
                scales, zeros = compute_qparams(w, spec, self.wq["row_block"])
                scales = scales.to(w.dtype)
                zeros = zeros.to(w.dtype) if zeros is not None else None
                self.weight.data.copy_(decode(encode(w, scales, zeros, spec), scales, zeros, spec,
                                              w.dtype).view_as(self.weight))
                self.fixed_quant = spec
                self.register_buffer("fixed_scales", scales)
                self.register_buffer("fixed_zeros", zeros)
                self.wq = None
                self.wq_bits = None
            if self.sparse is not None:
                self.weight.data.mul_(self._sparse_mask_now().detach().to(self.weight.dtype))
                self._drop("sparse", ("sparse_mask", "sparse_ready", "sparse_scores", "snip_score", "snip_step"))

    def _drop(self, technique: str, names: tuple[str, ...]) -> None:
        setattr(self, technique, None)
        setattr(self, f"{technique}_on", False)
        for n in names:
            if hasattr(self, n):
                delattr(self, n)

    def kept_rows(self) -> Tensor:
        return self._row_mask_now().detach().bool() if self.row is not None else None

    def keep_rows(self, keep: Tensor) -> None:
        """Remove the output rows (channels) not in ``keep`` (their bias too)."""
        with torch.no_grad():
            self.weight = nn.Parameter(self.weight.data[keep].clone())
            if self.bias is not None:
                self.bias = nn.Parameter(self.bias.data[keep].clone())
            if getattr(self, "fixed_scales", None) is not None:
                self.fixed_scales = self.fixed_scales[keep]
                self.fixed_zeros = self.fixed_zeros[keep] if self.fixed_zeros is not None else None
        self._drop("row", ("row_mask", "row_ready", "row_scores"))
        self._shape_changed()

    def keep_columns(self, keep: Tensor) -> None:
        """Remove the input columns (channels) not in ``keep``."""
        with torch.no_grad():
            self.weight = nn.Parameter(self.weight.data[:, keep].clone())
            fixed = getattr(self, "fixed_scales", None)
            if fixed is not None and fixed.shape[1] > 1:
                groups = fixed.shape[1]
                per = keep.numel() // groups
                kept_groups = keep.view(groups, per)
                if not bool((kept_groups.all(1) | ~kept_groups.any(1)).all()):
                    # a group lost part of its columns: its stored scales no longer describe it
                    self.fixed_scales = self.fixed_zeros = None
                    self.fixed_quant = None
                else:
                    g = kept_groups.all(1)
                    self.fixed_scales = fixed[:, g]
                    self.fixed_zeros = self.fixed_zeros[:, g] if self.fixed_zeros is not None else None
                    self.fixed_quant = QuantSpec(self.fixed_quant.bits, self.fixed_quant.group_size,
                                                 self.fixed_quant.symmetric)
        self._shape_changed()

    def ds_quant_export(self):
        """What ``save_quantized`` stores for this layer, or ``None`` when its weight is not quantized."""
        if not isinstance(self, nn.Linear):
            return None
        act = None
        if self.aq is not None:
            if self.aq["symmetric"] is not True:
                raise CompressionError("save_quantized: asymmetric activation quantization cannot be stored in "
                                       "the ds-quant format; use quantization_type 'symmetric'")
            act = ({"bits": self.aq["bits"], "dynamic": True, "granularity": "token", "symmetric": True}
                   if not self.aq["static"] else
                   {"bits": self.aq["bits"], "dynamic": False, "granularity": "tensor", "symmetric": True})
        act_scale = None
        if act is not None and not act["dynamic"]:
            act_scale = self.act_range.abs().max().float() / (2 ** (self.aq["bits"] - 1) - 1)
        if self.fixed_quant is not None and getattr(self, "fixed_scales", None) is not None:
            spec, scales, zeros = self.fixed_quant, self.fixed_scales, self.fixed_zeros
            if spec.group_size != -1:
                spec = QuantSpec(spec.bits, self.in_features // scales.shape[1], spec.symmetric)
            w = self.weight.detach()
            codes = encode(w, scales, zeros, spec)
            return (QuantizedWeight(codes, scales, zeros, spec), self.bias, None, act, "qat", act_scale)
        if self.wq is None and self.fixed_quant is None:
            if act is not None:
                raise CompressionError("save_quantized: a layer with activation quantization but no weight "
                                       "quantization cannot be stored in the ds-quant format; quantize its "
                                       "weights too")
            return None
        # still training: quantize as the forward does, then apply the masks to the codes
        spec = self.weight_quant_spec() if self.wq is not None else self.fixed_quant
        row_block = self.wq["row_block"] if self.wq is not None else 1
        w = self.weight.detach()
        scales, zeros = compute_qparams(w, spec, row_block)
        scales = scales.to(w.dtype)
        zeros = zeros.to(w.dtype) if zeros is not None else None
        codes = encode(w, scales, zeros, spec)
        eff, bias = self.effective_weight_bias()
        dropped = eff == 0
        if self.sparse is not None or self.row is not None or self.head is not None:
            if spec.bits == 1 and bool(dropped.any()):
                raise CompressionError("save_quantized: binary (1-bit) weights cannot be zero, so pruned "
                                       "weights cannot be stored; prune with 2 or more bits")
            zero_code = zeros.repeat_interleave(codes.shape[1] // zeros.shape[1], 1).to(codes.dtype) \
                if zeros is not None else torch.zeros_like(codes)
            codes = torch.where(dropped, zero_code, codes)
        return (QuantizedWeight(codes, scales, zeros, spec), bias, None, act, "qat", act_scale)


class CompressedLinear(_Compressed, nn.Linear):
    """An ``nn.Linear`` with the compression techniques ``init_compression`` enabled on it."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_compression_state()

    def enable_head_pruning(self, dense_ratio, method, num_heads, name) -> None:
        if self.in_features % num_heads:
            raise CompressionError(f"head_pruning: num_heads={num_heads} does not divide the {self.in_features} "
                                   f"inputs of {name!r}; set num_heads to the model's attention heads")
        self.head = {"ratio": dense_ratio, "method": method, "num_heads": num_heads}
        importance = self._head_importance()
        self.register_buffer("head_mask", torch.ones_like(importance))
        self.register_buffer("head_ready", torch.zeros((), dtype=torch.bool, device=importance.device))
        if method == "topk":
            self.head_scores = nn.Parameter(importance.clone())

    def _head_importance(self) -> Tensor:
        h = self.head["num_heads"]
        return self.weight.detach().abs().reshape(self.out_features, h, -1).sum(dim=(0, 2)).float()

    def _head_mask_now(self) -> Tensor:
        if self.head["method"] == "topk":
            return pruning.TopKBinarizer.apply(self.head_scores, self.head["ratio"])
        return self.head_mask

    def kept_heads(self) -> Tensor:
        return self._head_mask_now().detach().bool()

    def drop_head_state(self) -> None:
        self._drop("head", ("head_mask", "head_ready", "head_scores"))

    def _shape_changed(self) -> None:
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._weight_bias()
        return F.linear(self._quantize_input(x), w, b)

    def extra_repr(self) -> str:
        on = [k for k in ("wq", "aq", "sparse", "row", "head") if getattr(self, k) is not None]
        return f"in_features={self.in_features}, out_features={self.out_features}, compression={on}"


class CompressedConv2d(_Compressed, nn.Conv2d):
    """An ``nn.Conv2d`` with weight quantization, sparse and channel pruning, activation quantization."""

    def __init__(self, conv: nn.Conv2d) -> None:
        nn.Module.__init__(self)
        for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                    "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, key, getattr(conv, key))
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_compression_state()

    row_method = "channel_pruning"
    enable_channel_pruning = _Compressed.enable_row_pruning

    def _shape_changed(self) -> None:
        self.out_channels = self.weight.shape[0]
        self.in_channels = self.weight.shape[1] * self.groups

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._weight_bias()
        return self._conv_forward(self._quantize_input(x), w, b)
