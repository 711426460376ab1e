"""Post-training quantization: ``quantize(model, method=..., bits=..., group_size=..., calibration=...)``.

Every method ends in :class:`~ds_compress.qlinear.QuantizedLinear` layers built by the shared
group-wise quantizer, so :func:`~ds_compress.export.save_quantized` writes any of them.

- ``rtn``: round-to-nearest, group-wise; no data.
- ``gptq``: GPTQ (Frantar et al. 2022) with act-order and damping, block by block: the calibration
  inputs of each transformer block come from the blocks before it, already quantized (the paper's
  sequential scheme); layers outside the blocks (a separate head) are done last from full passes.
- ``zeroquant``: ZeroQuant (Yao et al. 2022): group-wise weights and token-wise dynamic int8
  activations (W8A8, or W4A8), optionally refined by layer-by-layer distillation (``lkd_steps``).
- ``xtc``: XTC (Wu et al. 2022, "Extreme Compression for Pre-trained Transformers Made Simple and
  Efficient"): ternary (``bits=2``) or binary (``bits=1``) weights trained by logit distillation from
  the full-precision model for ``distill_steps`` steps on the calibration batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .distill import (
    capture_block_inputs,
    find_blocks,
    layerwise_distill,
    logits_kd_loss,
    model_output_logits,
    run_batch,
)
from .errors import CompressionError
from .gptq import HessianAccumulator, gptq_quantize
from .matching import match_modules, set_module, tied_linears
from .qlinear import FakeQuantLinear, QuantizedLinear
from .quantizer import STORABLE_BITS, QuantSpec, check_spec, quantize_weight

__all__ = ["quantize", "METHODS", "TOKEN_INT8"]

METHODS = {"rtn": STORABLE_BITS, "gptq": STORABLE_BITS, "zeroquant": (8, 4), "xtc": (2, 1)}
TOKEN_INT8 = {"bits": 8, "dynamic": True, "granularity": "token", "symmetric": True}


def _targets(model: nn.Module, modules, exclude) -> list[str]:
    if modules is None:
        tied = tied_linears(model)
        names = [n for n in match_modules(model, ["*"], (nn.Linear,), "quantize", exclude) if n not in tied]
    else:
        names = match_modules(model, [modules] if isinstance(modules, str) else modules, (nn.Linear,),
                              "quantize(modules=...)", exclude)
    if not names:
        raise CompressionError("quantize: the model has no nn.Linear layer to quantize (tied output heads "
                               "are skipped unless named in modules=)")
    return names


def _activations(method: str, activations: Any) -> dict | None:
    if activations is None:
        return dict(TOKEN_INT8) if method == "zeroquant" else None
    if activations in ("token", "int8", 8):
        return dict(TOKEN_INT8)
    if activations is False or activations == "none":
        return None
    raise CompressionError(f"quantize: activations={activations!r} is not supported; use None, 'none' or "
                           f"'token' (dynamic per-token symmetric int8, ZeroQuant's W8A8)")


def quantize(model: nn.Module, method: str = "rtn", bits: int = 8, group_size: int = -1,
             calibration: Iterable[Any] | None = None, *, symmetric: bool = True, modules=None,
             exclude: Iterable[str] = (), damp: float = 0.01, act_order: bool = True,
             activations: Any = None, lkd_steps: int = 0, teacher: nn.Module | None = None,
             distill_steps: int = 200, lr: float = 1e-4, temperature: float = 1.0) -> nn.Module:
    """Quantize ``model``'s linear layers in place and return it.

    ``calibration`` is a list of batches the model accepts (a tensor, a tuple of positional
    arguments, or a dict of keyword arguments); GPTQ and XTC need it, ZeroQuant with ``lkd_steps``.
    ``modules`` (regular expressions) restricts the layers; by default every ``nn.Linear`` except an
    output head tied to the embedding. ``group_size=-1`` is one scale per output row.
    """
    if method not in METHODS:
        raise CompressionError(f"quantize: method={method!r} is not one of {', '.join(METHODS)}")
    allowed = METHODS[method]
    check_spec(QuantSpec(bits, group_size, symmetric), where=f"quantize(method={method!r})", allowed_bits=allowed)
    spec = QuantSpec(bits, group_size, symmetric)
    act = _activations(method, activations)
    names = _targets(model, modules, exclude)
    for name in names:
        layer = model.get_submodule(name)
        check_spec(spec, layer.in_features, where=f"quantize: layer {name!r}", allowed_bits=allowed)
        if bits < 8 and (layer.in_features * bits) % 8:
            raise CompressionError(f"quantize: layer {name!r} has {layer.in_features} inputs; {bits}-bit codes "
                                   f"pack {8 // bits} per byte, so the input dimension must be a multiple of "
                                   f"{8 // bits}; exclude the layer or use 8 bits")
    needs_data = method in ("gptq", "xtc") or (method == "zeroquant" and lkd_steps > 0)
    batches = list(calibration) if calibration is not None else []
    if needs_data and not batches:
        raise CompressionError(f"quantize(method={method!r}) needs calibration batches: pass calibration=[batch, "
                               f"...] with inputs the model accepts (a few hundred sequences is typical)")
    was_training = model.training
    model.eval()
    try:
        if method == "rtn" or (method == "zeroquant" and lkd_steps == 0):
            _rtn(model, names, spec, act, method)
        elif method == "gptq":
            _gptq(model, names, spec, act, batches, damp, act_order)
        elif method == "zeroquant":
            _zeroquant_lkd(model, names, spec, act, batches, lkd_steps, lr)
        else:
            _xtc(model, names, spec, act, batches, teacher, distill_steps, lr, temperature)
    finally:
        model.train(was_training)
    return model


def _rtn(model, names, spec, act, method) -> None:
    for name in names:
        layer = model.get_submodule(name)
        qw = quantize_weight(layer.weight.detach(), spec)
        set_module(model, name, QuantizedLinear.from_quantized(qw, layer.bias, activations=act, method=method))


def _gptq_layers(model, names, spec, act, hessians, damp, act_order) -> None:
    for name in names:
        layer = model.get_submodule(name)
        qw, perm = gptq_quantize(layer.weight.detach(), hessians[name].H, spec, damp=damp, act_order=act_order)
        set_module(model, name, QuantizedLinear.from_quantized(qw, layer.bias, perm=perm, activations=act,
                                                               method="gptq"))


def _hooks(model, names):
    hessians, handles = {}, []
    for name in names:
        layer = model.get_submodule(name)
        acc = hessians[name] = HessianAccumulator(layer.in_features, layer.weight.device)
        handles.append(layer.register_forward_hook(lambda _m, inp, _o, acc=acc: acc.add(inp[0])))
    return hessians, handles


def _gptq(model, names, spec, act, batches, damp, act_order) -> None:
    found = find_blocks(model)
    done: set[str] = set()
    if found is not None:
        prefix, blocks = found
        inputs = capture_block_inputs(model, blocks[0], batches)
        for i, block in enumerate(blocks):
            mine = [n for n in names if n.startswith(f"{prefix}.{i}.")]
            if mine:
                hessians, handles = _hooks(model, mine)
                with torch.no_grad():
                    for a, k in inputs:
                        block(*a, **k)
                for h in handles:
                    h.remove()
                _gptq_layers(model, mine, spec, act, hessians, damp, act_order)
                done.update(mine)
            with torch.no_grad():  # the next block sees this block's quantized output
                inputs = [((_hidden(block(*a, **k)),) + tuple(a[1:]), k) for a, k in inputs]
    rest = [n for n in names if n not in done]
    if rest:
        hessians, handles = _hooks(model, rest)
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
        for h in handles:
            h.remove()
        _gptq_layers(model, rest, spec, act, hessians, damp, act_order)


def _hidden(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _to_fake(model, names, spec, act) -> None:
    for name in names:
        set_module(model, name, FakeQuantLinear(model.get_submodule(name), spec, act))


def _finish_fake(model, method) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            set_module(model, name, m.to_quantized(method))


def _zeroquant_lkd(model, names, spec, act, batches, steps, lr) -> None:
    found = find_blocks(model)
    if found is None:
        raise CompressionError("quantize(method='zeroquant', lkd_steps>0): layer-by-layer distillation needs "
                               "the model's blocks in an nn.ModuleList; none holds linear layers")
    prefix, blocks = found
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_blocks = teacher.get_submodule(prefix)
    inputs = capture_block_inputs(teacher, teacher_blocks[0], batches)
    _to_fake(model, names, spec, act)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # LKD trains only the quantized linear weights of each block
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.weight.requires_grad_(True)
    try:
        layerwise_distill(list(blocks), list(teacher_blocks), inputs, steps=steps, lr=lr)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    _finish_fake(model, "zeroquant")


def _xtc(model, names, spec, act, batches, teacher, steps, lr, temperature) -> None:
    teacher = copy.deepcopy(model) if teacher is None else teacher
    teacher.eval()
    _to_fake(model, names, spec, act)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = model_output_logits(run_batch(teacher, batch))
        loss = logits_kd_loss(model_output_logits(run_batch(model, batch)), target, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _finish_fake(model, "xtc")
