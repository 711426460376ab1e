"""An independent reader of the ds-quant format, written from docs/quantized-format.md alone.

It shares no code with ds_compress: it unpacks codes bit by bit, dequantizes them with the formulas
of the page, and runs a model from the stored tensors. The export tests check ds_compress against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    desc = json.loads((path / "ds_quant.json").read_text())
    index = path / "model.safetensors.index.json"
    if index.exists():
        tensors = {}
        for fname in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(path / fname)))
    else:
        tensors = load_file(str(path / "model.safetensors"))
    return desc, tensors


def codes(qweight: torch.Tensor, bits: int, symmetric: bool, in_features: int) -> torch.Tensor:
    """Integer codes ``[out, in]``: byte by byte, lowest column in the lowest bits."""
    if bits == 8:
        assert qweight.dtype == (torch.int8 if symmetric else torch.uint8)
        return qweight.long()
    assert qweight.dtype == torch.uint8 and qweight.shape[1] * 8 == in_features * bits
    out = torch.empty(qweight.shape[0], in_features, dtype=torch.long)
    per = 8 // bits
    q = qweight.long()
    for j in range(in_features):
        field = (q[:, j // per] >> ((j % per) * bits)) & ((1 << bits) - 1)
        out[:, j] = field - (2 ** (bits - 1) if symmetric and bits > 1 else 0)
    return out


def weight(desc: dict, tensors: dict, name: str) -> torch.Tensor:
    """The dequantized weight of module ``name`` over the stored (possibly permuted) columns."""
    e = desc["modules"][name]
    q = codes(tensors[f"{name}.qweight"], e["bits"], e["symmetric"], e["in_features"]).double()
    scales = tensors[f"{name}.scales"].double()
    gs = e["in_features"] if e["group_size"] == -1 else e["group_size"]
    assert scales.shape == (e["out_features"], e["in_features"] // gs)
    g = torch.arange(e["in_features"]) // gs
    if e["bits"] == 1:
        w = (2 * q - 1) * scales[:, g]
    elif e["symmetric"]:
        top = 2 ** (e["bits"] - 1) - 1
        assert int(q.abs().max()) <= top
        w = q * scales[:, g]
    else:
        assert int(q.min()) >= 0 and int(q.max()) <= 2 ** e["bits"] - 1
        w = (q - tensors[f"{name}.zeros"].double()[:, g]) * scales[:, g]
    return w


def linear(desc: dict, tensors: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """What a quantized linear computes, per the page: permute, quantize the input, GEMM, bias."""
    e = desc["modules"][name]
    dtype = getattr(torch, desc["dtype"])
    x = x.to(dtype)
    if e["perm"]:
        x = x[..., tensors[f"{name}.perm"].long()]
    act = desc["activations"]
    if act is not None:
        top = 2 ** (act["bits"] - 1) - 1
        if act["dynamic"]:
            s = x.abs().amax(-1, keepdim=True).float() / top
        else:
            s = tensors[f"{name}.act_scale"].float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        x = (torch.round(x.float() / s).clamp(-top, top) * s).to(dtype)
    w = weight(desc, tensors, name).to(dtype)
    b = tensors[f"{name}.bias"] if e["bias"] else None
    return F.linear(x, w, b)


class Reference(torch.nn.Module):
    """Wraps a stored quantized linear so an unquantized model can run the checkpoint."""

    def __init__(self, desc, tensors, name):
        super().__init__()
        self.desc, self.tensors, self.name = desc, tensors, name

    def forward(self, x):
        return linear(self.desc, self.tensors, self.name, x)


def load_into(model: torch.nn.Module, path) -> torch.nn.Module:
    """Make ``model`` (the unquantized architecture) compute what the checkpoint stores."""
    desc, tensors = read(path)
    for name in desc["modules"]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, Reference(desc, tensors, name))
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in desc["modules"])}
    model.load_state_dict(rest, strict=False)
    return model
