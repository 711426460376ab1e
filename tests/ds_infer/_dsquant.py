"""A ds-quant checkpoint writer for the tests, written from docs/quantized-format.md alone.

It is deliberately independent of ds_infer's own quantizer and of ds-compress: the tests check that
ds_infer reads what the format page describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool, perm: torch.Tensor | None = None):
    """Codes of ``w [out, in]`` (columns permuted by ``perm`` first) -> stored tensors + the dense
    weight they describe in the original column order."""
    out, cols = w.shape
    wp = w[:, perm] if perm is not None else w
    g = cols if group == -1 else group
    wg = wp.reshape(out, cols // g, g).float()
    zeros = None
    if bits == 1:
        scales = wg.abs().mean(-1)
        q = (wg > 0).to(torch.int16)
        deq = (2 * q - 1) * scales[..., None]
    elif symmetric:
        qmax = 2 ** (bits - 1) - 1
        scales = (wg.abs().amax(-1) / qmax).clamp_min(1e-8)
        q = torch.round(wg / scales[..., None]).clamp(-qmax, qmax).to(torch.int16)
        deq = q * scales[..., None]
    else:
        top = 2**bits - 1
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scales = ((hi - lo) / top).clamp_min(1e-8)
        zeros = torch.round(-lo / scales)
        q = torch.round(wg / scales[..., None] + zeros[..., None]).clamp(0, top).to(torch.int16)
        deq = (q - zeros[..., None]) * scales[..., None]
    q = q.reshape(out, cols)
    deq = deq.reshape(out, cols)
    dense = torch.empty_like(deq)
    if perm is not None:
        dense[:, perm] = deq
    else:
        dense = deq
    if bits == 8:
        qweight = q.to(torch.int8 if symmetric else torch.uint8)
    else:
        field = (q + (2 ** (bits - 1) if symmetric and bits > 1 else 0)).to(torch.uint8)
        per = 8 // bits
        field = field.view(out, cols // per, per)
        qweight = torch.zeros(out, cols // per, dtype=torch.uint8)
        for j in range(per):
            qweight |= field[:, :, j] << (j * bits)
    return qweight, scales, zeros, dense


def write(state: dict[str, torch.Tensor], schemes: dict[str, dict], out: Path, *, dtype=torch.float32,
          activations: dict | None = None, config: dict | None = None, shards: int = 1,
          act_scales: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Write ``state`` with the linears named in ``schemes`` quantized; returns the dense weights the
    codes stand for (``{module}.weight`` -> tensor) so a reference model can use them."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    modules = {}
    for name, t in state.items():
        module = name.rsplit(".", 1)[0]
        if module in schemes and name.endswith(".weight"):
            s = schemes[module]
            w = t.float()
            perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(len(name))) \
                if s.get("perm") else None
            qweight, scales, zeros, deq = quantize(w, s["bits"], s["group_size"], s.get("symmetric", True), perm)
            tensors[f"{module}.qweight"] = qweight
            tensors[f"{module}.scales"] = scales.to(dtype)
            if zeros is not None:
                tensors[f"{module}.zeros"] = zeros.to(dtype)
            if perm is not None:
                tensors[f"{module}.perm"] = perm.to(torch.int32)
            if act_scales and module in act_scales:
                tensors[f"{module}.act_scale"] = torch.tensor(act_scales[module], dtype=torch.float32)
            dense[name] = deq.to(t.dtype)
            modules[module] = {"bits": s["bits"], "group_size": s["group_size"],
                               "symmetric": s.get("symmetric", True), "in_features": w.shape[1],
                               "out_features": w.shape[0], "bias": f"{module}.bias" in state,
                               "perm": perm is not None}
        else:
            tensors[name] = t.to(dtype) if t.is_floating_point() else t
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(out / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({k: tensors[k].contiguous() for k in part}, str(out / file))
            weight_map.update({k: file for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    first = next(iter(schemes.values()))
    (out / "ds_quant.json").write_text(json.dumps({
        "format": "ds-quant", "version": 1, "method": "rtn", "dtype": str(dtype).removeprefix("torch."),
        "weights": {"bits": first["bits"], "group_size": first["group_size"],
                    "symmetric": first.get("symmetric", True)},
        "activations": activations, "modules": modules}))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    return dense
