"""Filling a native model built on the meta device from a checkpoint, one rank's slices at a time.

Each model family's ``load_weights(loader)`` names, for every parameter and linear layer, the
checkpoint tensors it comes from (with alternatives: the names ``save_pretrained`` writes and
the names a ``transformers`` model holds in memory) and the rows/columns this rank keeps. The
loader runs that description twice:

1. **check**: shapes only, from the files' metadata — a missing tensor, a missing shard or a
   shape that does not fit the config fails here, naming the tensor, before any weight is read;
2. **load**: each slice is read, cast to the compute dtype, moved to the device, and every linear
   is built by the :class:`LinearFactory` (plain ``nn.Linear``, a quantized linear when the
   checkpoint holds ``.qweight`` codes or quantization is asked for, a bitsandbytes layer, ...).

Fused projections (q/k/v, gate/up) are concatenations of their parts' rows; a part that cannot be
fused with its neighbours (differently quantized) stays a separate layer inside a
:class:`ConcatLinear`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .sources import CheckpointError, TensorSource

__all__ = ["Part", "WeightLoader", "LinearFactory", "ConcatLinear", "QuantizedParts", "set_param"]

Names = str | Sequence[str]


@dataclass(frozen=True)
class Part:
    """One checkpoint linear (``prefix``.weight/.bias or its quantized tensors) inside a fused one.

    ``out``: its full output size; ``rows``: the slice of those outputs this rank holds, or several
    slices read one after the other (replicated grouped-query KV heads).
    """

    prefix: Names
    out: int
    rows: slice | tuple[slice, ...] | list[slice] | None = None


@dataclass
class QuantizedParts:
    """The quantized tensors of one linear (or several fused ones) as stored, sliced for this rank."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    bias: Tensor | None
    perm: Tensor | None
    act_scale: Tensor | None
    scheme: dict  # bits, group_size, symmetric, in_features, out_features (of the slice)
    activations: dict | None


def set_param(model: nn.Module, path: str, value: Tensor) -> None:
    parent, _, name = path.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    if isinstance(getattr(module, name, None), nn.Parameter) or name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        setattr(module, name, value)


class ConcatLinear(nn.Module):
    """Several linears on the same input whose outputs are concatenated (an unfusable q/k/v)."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class LinearFactory:
    """Builds the module for each linear layer. Subclasses change what a dense or quantized linear becomes."""

    def dense(self, path: str, weight: Tensor, bias: Tensor | None) -> nn.Module:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def quantized(self, path: str, q: QuantizedParts) -> nn.Module:
        from ..quant.linear import QuantLinear

        return QuantLinear.from_parts(q)


class WeightLoader:
    """See the module docstring. ``quant_modules``: ds-quant scheme per checkpoint module name."""

    def __init__(self, model: nn.Module, source: TensorSource, dtype: torch.dtype, device: torch.device,
                 factory: LinearFactory | None = None, check: bool = False,
                 quant_modules: dict[str, dict] | None = None, activations: dict | None = None,
                 where: str = "checkpoint") -> None:
        self.model, self.source, self.dtype, self.device = model, source, dtype, torch.device(device)
        self.factory = factory or LinearFactory()
        self.check = check
        self.quant_modules = quant_modules or {}
        self.activations = activations
        self.where = where
        self.names = source.names()
        self.used: set[str] = set()

    # -- tensors -------------------------------------------------------------------------------

    def has(self, names: Names) -> bool:
        return self.find(names) is not None

    def find(self, names: Names) -> str | None:
        for name in [names] if isinstance(names, str) else names:
            if name in self.names:
                return name
        return None

    def resolve(self, names: Names) -> str:
        found = self.find(names)
        if found is None:
            alts = [names] if isinstance(names, str) else list(names)
            raise CheckpointError(f"{self.where}: tensor {' or '.join(map(repr, alts))} is missing; the "
                                  "checkpoint does not match the model's config.json (wrong directory, an "
                                  "incomplete save, or a different architecture)")
        return found

    def tensor(self, names: Names, shape: Sequence[int], rows: slice | None = None, cols: slice | None = None,
               transpose: bool = False, cast: bool = True) -> Tensor:
        """The tensor stored under ``names`` (full ``shape`` checked), rows/cols of it, on device."""
        name = self.resolve(names)
        stored = self.source.shape(name)
        expect = tuple(shape[::-1]) if transpose and len(shape) == 2 else tuple(shape)
        if tuple(stored) != expect:
            raise CheckpointError(f"{self.where}: tensor {name!r} has shape {tuple(stored)} but the model's "
                                  f"config implies {expect}; the checkpoint was saved from a different config "
                                  "(compare config.json with the weights) or is corrupt")
        self.used.add(name)
        out_shape = list(shape) if not shape else \
            [_len(rows, shape[0])] + ([_len(cols, shape[1])] if len(shape) > 1 else []) + list(shape[2:])
        if self.check:
            return torch.empty(out_shape, device="meta", dtype=self.source.dtype(name))
        if isinstance(rows, (list, tuple)):  # several runs of rows (replicated KV heads): read each
            pieces = [self.source.read(name, cols, r).t() if transpose else self.source.read(name, r, cols)
                      for r in rows]
            t = torch.cat(pieces, dim=0)
        else:
            t = self.source.read(name, cols, rows).t() if transpose else self.source.read(name, rows, cols)
        if cast and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device).contiguous()

    def param(self, path: str, names: Names, shape: Sequence[int], rows: slice | None = None,
              cols: slice | None = None) -> Tensor:
        t = self.tensor(names, shape, rows, cols)
        if not self.check:
            set_param(self.model, path, t)
        return t

    # -- linears -------------------------------------------------------------------------------

    def _prefix(self, part: Part) -> str:
        """The checkpoint prefix of ``part``: the first alternative with a weight or quantized codes."""
        for prefix in [part.prefix] if isinstance(part.prefix, str) else part.prefix:
            if f"{prefix}.weight" in self.names or f"{prefix}.qweight" in self.names:
                return prefix
        alts = [part.prefix] if isinstance(part.prefix, str) else list(part.prefix)
        return self.resolve([f"{p}.weight" for p in alts]).removesuffix(".weight")

    def linear(self, path: str, parts: Sequence[Part], in_features: int, *, cols: slice | None = None,
               bias: bool = False, row_parallel: bool = False, transpose: bool = False) -> nn.Module:
        """Build the linear ``path`` of the model from ``parts`` (concatenated along outputs).

        ``cols``: this rank's input slice (row-parallel); ``row_parallel`` biases live on rank 0 only
        so the later all-reduce adds them once. ``transpose``: stored ``[in, out]`` (GPT-2's Conv1D).
        """
        prefixes = [self._prefix(p) for p in parts]
        quantized = [f"{p}.qweight" in self.names for p in prefixes]
        if any(quantized):
            module = self._quantized_linear(path, parts, prefixes, quantized, in_features, cols, row_parallel)
        else:
            module = self._dense_linear(path, parts, prefixes, in_features, cols, bias, row_parallel, transpose)
        if not self.check:
            self.model.set_submodule(path, module)
        return module

    def _bias(self, prefix: str, part: Part, row_parallel: bool, rank_zero: bool) -> Tensor | None:
        name = f"{prefix}.bias"
        if name not in self.names:
            return None
        if row_parallel and not rank_zero:
            b = self.tensor(name, (part.out,), part.rows)
            return b if self.check else torch.zeros_like(b)
        return self.tensor(name, (part.out,), part.rows)

    def _dense_linear(self, path, parts, prefixes, in_features, cols, bias, row_parallel, transpose):
        rank_zero = getattr(getattr(self.model, "par", None), "rank", 0) == 0
        weights, biases = [], []
        for part, prefix in zip(parts, prefixes):
            weights.append(self.tensor(f"{prefix}.weight", (part.out, in_features), part.rows, cols,
                                       transpose=transpose))
            biases.append(self._bias(prefix, part, row_parallel, rank_zero))
        if bias and any(b is None for b in biases):
            missing = [p for p, b in zip(prefixes, biases) if b is None]
            raise CheckpointError(f"{self.where}: {missing[0]}.bias is missing; the config says this "
                                  "layer has a bias")
        if self.check:
            return None
        weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
        b = None if biases[0] is None else (biases[0] if len(biases) == 1 else torch.cat(biases))
        return self.factory.dense(path, weight, b)

    def _quantized_linear(self, path, parts, prefixes, quantized, in_features, cols, row_parallel):
        if not all(quantized):
            raise CheckpointError(f"{self.where}: {path} fuses {', '.join(prefixes)} but only some of them are "
                                  "quantized; quantize all of them or none")
        rank_zero = getattr(getattr(self.model, "par", None), "rank", 0) == 0
        built = [self._read_quantized(prefix, part, in_features, cols, row_parallel, rank_zero)
                 for part, prefix in zip(parts, prefixes)]
        if self.check:
            return None
        fusable = len({_scheme_key(q.scheme) for q in built}) == 1 and all(q.perm is None for q in built) \
            and all(q.act_scale is None for q in built)
        if len(built) == 1 or fusable:
            q = built[0] if len(built) == 1 else _concat_quantized(built)
            return self.factory.quantized(path, q)
        return ConcatLinear([self.factory.quantized(f"{path}.{i}", q) for i, q in enumerate(built)])

    def _read_quantized(self, prefix, part, in_features, cols, row_parallel, rank_zero) -> QuantizedParts:
        scheme = self.quant_modules.get(prefix)
        if scheme is None:
            raise CheckpointError(f"{self.where}: {prefix}.qweight is stored but ds_quant.json lists no module "
                                  f"{prefix!r}; the scheme file and the tensors do not belong together")
        bits, group = int(scheme["bits"]), int(scheme["group_size"])
        if int(scheme.get("in_features", in_features)) != in_features or \
                int(scheme.get("out_features", part.out)) != part.out:
            raise CheckpointError(f"{self.where}: {prefix} is quantized as {scheme.get('out_features')}x"
                                  f"{scheme.get('in_features')} but the model's config implies {part.out}x{in_features}")
        group = in_features if group == -1 else group
        if in_features % group:
            raise CheckpointError(f"{self.where}: {prefix}: group_size {group} does not divide in_features "
                                  f"{in_features}; see docs/quantized-format.md")
        n_groups = in_features // group
        per_byte = 8 // bits if bits < 8 else 1
        qcols = gcols = None
        if cols is not None:
            if scheme.get("perm"):
                raise CheckpointError(f"{self.where}: {prefix} has an act-order permutation (perm) and is split by "
                                      "input columns across tensor-parallel ranks; the permuted groups do not "
                                      "follow the split. Use tp=1 or a checkpoint quantized without act-order")
            if cols.start % group or cols.stop % group:
                raise CheckpointError(f"{self.where}: {prefix}: this rank's input columns {cols.start}:{cols.stop} "
                                      f"do not fall on group boundaries (group_size {group}); choose a group "
                                      "size dividing in_features / tp")
            qcols = slice(cols.start // per_byte, cols.stop // per_byte)
            gcols = slice(cols.start // group, cols.stop // group)
        qweight = self.tensor(f"{prefix}.qweight", (part.out, in_features // per_byte), part.rows, qcols, cast=False)
        scales = self.tensor(f"{prefix}.scales", (part.out, n_groups), part.rows, gcols)
        zeros = None
        if not scheme.get("symmetric", True):
            zeros = self.tensor(f"{prefix}.zeros", (part.out, n_groups), part.rows, gcols)
        perm = self.tensor(f"{prefix}.perm", (in_features,), cast=False) if scheme.get("perm") else None
        act_scale = None
        if self.activations and not self.activations.get("dynamic", True):
            act_scale = self.tensor(f"{prefix}.act_scale", (), cast=False)
        b = self._bias(prefix, part, row_parallel, rank_zero)
        local_in = (cols.stop - cols.start) if cols is not None else in_features
        local_out = _len(part.rows, part.out)
        return QuantizedParts(qweight, scales, zeros, b, perm, act_scale,
                              dict(scheme, in_features=local_in, out_features=local_out, group_size=group),
                              self.activations)

    # -- after loading -------------------------------------------------------------------------

    def unused(self) -> list[str]:
        return sorted(self.names - self.used)


def _len(s: slice | Sequence[slice] | None, n: int) -> int:
    if isinstance(s, (list, tuple)):
        return sum(_len(r, n) for r in s)
    return n if s is None else len(range(*s.indices(n)))


def _scheme_key(s: dict) -> tuple:
    return int(s["bits"]), int(s["group_size"]), bool(s.get("symmetric", True))


def _concat_quantized(parts: list[QuantizedParts]) -> QuantizedParts:
    first = parts[0]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=0)  # noqa: E731
    return QuantizedParts(
        qweight=cat([p.qweight for p in parts]), scales=cat([p.scales for p in parts]),
        zeros=cat([p.zeros for p in parts]), bias=_cat_bias(parts), perm=None, act_scale=None,
        scheme=dict(first.scheme, out_features=sum(p.scheme["out_features"] for p in parts)),
        activations=first.activations)


def _cat_bias(parts: list[QuantizedParts]) -> Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias if p.bias is not None else
                      torch.zeros(p.scheme["out_features"], dtype=p.scales.dtype, device=p.scales.device)
                      for p in parts])
