"""Writing (and reading back) the ds-quant checkpoint format: docs/quantized-format.md.

``save_quantized(model, out_dir)`` writes ``ds_quant.json`` and ``model.safetensors`` (or shards with
an index) for any model quantized by ds-compress: post-training (:class:`QuantizedLinear`), trained
with weight quantization (``init_compression``; before or after ``redundancy_clean``), or distilled
(:class:`FakeQuantLinear`). ``load_quantized(model, out_dir)`` rebuilds the quantized layers into a
model of the same architecture (ds-compress reading its own output; ds-infer has its own reader).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CompressionError
from .matching import set_module
from .packing import pack, unpack
from .qlinear import FakeQuantLinear, QuantizedLinear
from .quantizer import STORABLE_BITS, QuantizedWeight, QuantSpec

__all__ = ["save_quantized", "load_quantized", "FORMAT", "VERSION"]

FORMAT, VERSION = "ds-quant", 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


def _quantized_layers(model: nn.Module) -> dict[str, tuple[QuantizedWeight, Tensor | None, Tensor | None, Any, str, Tensor | None]]:
    """name -> (codes/scales/zeros, bias, perm, activation spec, method, act_scale) of every quantized linear."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            found[name] = (m.quantized_weight(), m.bias, m.perm, m.activations, m.method, m.act_scale)
        elif isinstance(m, FakeQuantLinear):
            q = m.to_quantized("qat")
            found[name] = (q.quantized_weight(), q.bias, None, m.activations, "qat", None)
        else:
            export = getattr(m, "ds_quant_export", None)  # compression-training layers
            if export is not None:
                item = export()
                if item is not None:
                    found[name] = item
    return found


def _check_storable(name: str, spec: QuantSpec, in_features: int) -> None:
    if spec.bits not in STORABLE_BITS:
        raise CompressionError(f"save_quantized: layer {name!r} is quantized to {spec.bits} bits; the ds-quant "
                               f"format stores {', '.join(map(str, STORABLE_BITS))} bits: train to a target_bits "
                               f"among those")
    if spec.bits < 8 and (in_features * spec.bits) % 8:
        raise CompressionError(f"save_quantized: layer {name!r} has {in_features} inputs, not a multiple of "
                               f"{8 // spec.bits} ({spec.bits}-bit codes pack {8 // spec.bits} per byte)")


def _model_dtype(model: nn.Module, layers) -> torch.dtype:
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    for qw, *_ in layers.values():
        counts[qw.scales.dtype] += 1
    return counts.most_common(1)[0][0] if counts else torch.float32


def _same(values: list, what: str, names: list[str]):
    distinct = {json.dumps(v, sort_keys=True) for v in values}
    if len(distinct) > 1:
        raise CompressionError(f"save_quantized: the quantized layers use different {what} "
                               f"({', '.join(sorted(distinct))}, e.g. {names[0]!r}); the ds-quant format has one "
                               f"activation scheme for the whole model: quantize activations of every "
                               f"quantized layer alike")
    return values[0] if values else None


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                   max_shard_size: int | None = None) -> Path:
    """Write ``model`` in the ds-quant format to ``out_dir`` and return the directory.

    ``tokenizer``: an object with ``save_pretrained`` or a directory whose tokenizer files are copied.
    ``max_shard_size`` (bytes): split ``model.safetensors`` into Hugging Face-style shards.
    """
    layers = _quantized_layers(model)
    if not layers:
        raise CompressionError("save_quantized: the model has no quantized layer; run ds_compress.quantize(...) "
                               "or train with weight_quantization first")
    dtype = _model_dtype(model, layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict] = {}
    acts: list = []
    methods = []
    for name, (qw, bias, perm, act, method, act_scale) in layers.items():
        out_features, in_features = qw.codes.shape
        _check_storable(name, qw.spec, in_features)
        tensors[f"{name}.qweight"] = pack(qw.codes, qw.spec.bits, qw.spec.symmetric, where=name)
        tensors[f"{name}.scales"] = qw.scales.to(dtype)
        if not qw.spec.symmetric:
            tensors[f"{name}.zeros"] = qw.zeros.to(dtype)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to(dtype)
        if perm is not None:
            tensors[f"{name}.perm"] = perm.to(torch.int32)
        if act is not None and not act.get("dynamic", True):
            tensors[f"{name}.act_scale"] = act_scale.detach().float().reshape(())
        modules[name] = {**qw.spec.as_dict(), "in_features": in_features, "out_features": out_features,
                         "bias": bias is not None, "perm": perm is not None}
        acts.append(act)
        methods.append(method)
    activations = _same(acts, "activation quantization", list(layers))

    quantized_prefixes = tuple(f"{n}." for n in layers)
    seen: dict[int, str] = {}
    for key, value in _plain_state(model).items():
        if key.startswith(quantized_prefixes):
            continue
        ident = (value.data_ptr(), value.shape, value.dtype) if value.numel() else None
        if ident is not None and ident in seen:  # a tied tensor is stored once, under its first name
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = (value.detach().to(dtype) if value.is_floating_point() else value.detach()).contiguous()

    weights = Counter(json.dumps(qw.spec.as_dict(), sort_keys=True) for qw, *_ in layers.values()).most_common(1)[0][0]
    method = Counter(methods).most_common(1)[0][0]
    description = {"format": FORMAT, "version": VERSION, "method": method,
                   "dtype": str(dtype).removeprefix("torch."), "weights": json.loads(weights),
                   "activations": activations, "modules": modules}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _write_tensors(out, tensors, max_shard_size)
    (out / "ds_quant.json").write_text(json.dumps(description, indent=2) + "\n")
    _write_extras(model, out, tokenizer)
    return out


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict, with compression-training layers contributing only their effective weight/bias."""
    state = model.state_dict(keep_vars=False)
    for name, m in model.named_modules():
        effective = getattr(m, "effective_weight_bias", None)
        if effective is None or getattr(m, "ds_quant_export", lambda: None)() is not None:
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):]]:
            del state[key]
        w, b = effective()
        state[f"{prefix}weight"] = w.detach()
        if b is not None:
            state[f"{prefix}bias"] = b.detach()
    return state


def _write_tensors(out: Path, tensors: dict[str, Tensor], max_shard_size: int | None) -> None:
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if not max_shard_size:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _write_extras(model: nn.Module, out: Path, tokenizer: Any) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(out / "config.json"))
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    if not src.is_dir():
        raise CompressionError(f"save_quantized: tokenizer={str(tokenizer)!r} is neither a tokenizer object nor "
                               f"a directory; pass the tokenizer or the directory holding its files")
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            shutil.copyfile(src / fname, out / fname)


def read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a ds-quant directory (single file or shards)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, Tensor] = {}
        for fname in files:
            tensors.update(load_file(str(path / fname)))
        return tensors
    return load_file(str(path / "model.safetensors"))


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put a ds-quant checkpoint into ``model`` (same architecture, unquantized): listed linears become
    :class:`QuantizedLinear`, everything else is loaded by name. Returns the model."""
    path = Path(path)
    desc = json.loads((path / "ds_quant.json").read_text())
    if desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise CompressionError(f"load_quantized: {path} holds format {desc.get('format')!r} version "
                               f"{desc.get('version')!r}; this reader understands {FORMAT!r} version {VERSION}")
    dtype = getattr(torch, desc["dtype"])
    tensors = read_tensors(path)
    act = desc.get("activations")
    for name, entry in desc["modules"].items():
        spec = QuantSpec(entry["bits"], entry["group_size"], entry["symmetric"])
        codes = unpack(tensors.pop(f"{name}.qweight"), spec.bits, spec.symmetric, entry["in_features"])
        qw = QuantizedWeight(codes, tensors.pop(f"{name}.scales").to(dtype),
                             tensors.pop(f"{name}.zeros").to(dtype) if not spec.symmetric else None, spec)
        bias = tensors.pop(f"{name}.bias") if entry["bias"] else None
        perm = tensors.pop(f"{name}.perm") if entry["perm"] else None
        act_scale = tensors.pop(f"{name}.act_scale", None)
        set_module(model, name, QuantizedLinear.from_quantized(qw, bias, perm=perm, activations=act,
                                                               method=desc.get("method", "rtn"), act_scale=act_scale))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    quantized = tuple(f"{n}." for n in desc["modules"])
    missing = [k for k in missing if not k.startswith(quantized)]
    if unexpected:
        raise CompressionError(f"load_quantized: {path} has tensors the model does not: {unexpected[:5]}")
    state = model.state_dict()
    untied = [k for k in missing if not any(state[k].data_ptr() == state[o].data_ptr()
                                            for o in tensors if o in state)]
    if untied:
        raise CompressionError(f"load_quantized: {path} lacks tensors the model needs: {untied[:5]}")
    return model
