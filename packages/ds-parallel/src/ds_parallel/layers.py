"""Tensor-parallel layers: column- and row-parallel linear, vocabulary-parallel embedding.

Megatron-LM's split of a transformer (Shoeybi et al. 2019, section 3): the first linear of an MLP and
the Q/K/V projections are *column-parallel* (each rank computes some output features: some heads,
some of the hidden units), the second linear and the attention output projection are *row-parallel*
(each rank multiplies its slice of the input features and the partial sums are added with one
all-reduce). A block costs one all-reduce in forward and one in backward.

Every layer keeps the names of the module it replaces (``weight``, ``bias``), so state dicts keep
the model's own keys, and each sharded parameter carries a :class:`~ds_parallel.shards.ShardInfo`
(``param.ds_tp``) saying which rows of the full tensor it holds: that is what loading from
safetensors, checkpoints and consolidation read.

Layers take a :class:`~ds_parallel.comm.TensorGroup`; with a group of size one they are the plain
layer (no collective, same numbers).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ds_core.errors import ConfigError

from . import _seam
from .checkpoint import install_shard_keys, shard_key
from .comm import TensorGroup, copy_to_group, gather_from_group, reduce_from_group, scatter_to_group
from .grads import sum_gradient_over
from .shards import ColumnSpec, Part, ShardInfo, VocabPart, column_spec, even_run, take_runs, vocab_sizes

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "shard_info",
           "is_conv1d", "use_shard_names"]


def shard_info(param: torch.Tensor) -> ShardInfo | None:
    """The :class:`ShardInfo` of a tensor-parallel parameter (``None``: an ordinary parameter)."""
    return getattr(param, "ds_tp", None)


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D`` (a linear layer storing its weight as ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _slice(full: torch.Tensor | None, dim: int, runs, dtype, device) -> torch.Tensor | None:
    """Rows ``runs`` of ``full`` as a new tensor (``None`` when there is nothing to copy: no or meta)."""
    if full is None or full.is_meta:
        return None
    with torch.no_grad():
        return take_runs(full.detach(), dim, runs).to(dtype=dtype, device=device).clone()


def _param(local: torch.Tensor | None, full: torch.Tensor | None, shape, dtype, device,
           reuse: bool = False) -> nn.Parameter:
    """A parameter holding ``local`` (uninitialised, or meta, when ``None``).

    [Note: parameter identity] With ``reuse``, the full parameter object itself takes the shard
    (``full.data = local``): an optimizer built over the model before it was sharded then steps the
    shards (plans apply this way; its state must still be empty).
    """
    if local is None:
        device = torch.device("meta") if full is not None else device
        return nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
    if reuse and isinstance(full, nn.Parameter) and full.device == local.device and full.dtype == local.dtype:
        full.data = local
        return full
    return nn.Parameter(local, requires_grad=full.requires_grad if full is not None else True)


def _new_param(full: torch.Tensor | None, shape, dim: int, runs, dtype, device, reuse: bool = False) -> nn.Parameter:
    """A parameter holding rows ``runs`` of ``full`` (uninitialised, or meta, when ``full`` is None/meta)."""
    return _param(_slice(full, dim, runs, dtype, device), full, shape, dtype, device, reuse)


class _ShardNamed:
    """Where a layer registers its shards: under their own names (``weight``) by default, or — after
    :func:`use_shard_names`, which :func:`~ds_parallel.apply.apply_plan` calls — under their shard keys
    (see [Note: shard keys] in ``checkpoint.py``), e.g. ``weight#tp:1/2:dim0:48x48:24+24``, so parameter
    names, state-dict keys and every checkpoint layout keyed by them tell shards apart and say which
    rows they hold. ``module.weight`` returns the shard either way, and assigning it (tying) works.
    """

    def _set_shard(self, local: str, param: nn.Parameter | None) -> None:
        names = self.__dict__.setdefault("_shard_names", {})
        self.__dict__.setdefault("_tp_locals", set()).add(local)
        old = names.pop(local, None)
        if old is not None:
            self._parameters.pop(old, None)
        if param is None:
            nn.Module.__setattr__(self, local, None)
            return
        info = getattr(param, "ds_tp", None)
        if info is None or self.tp.size == 1 or not self.__dict__.get("_shard_named", False):
            nn.Module.__setattr__(self, local, param)
        else:
            self.__dict__.pop(local, None)
            self._parameters.pop(local, None)
            key = shard_key(info.target, info, self.tp.rank, self.tp.size)
            self.register_parameter(key, param)
            names[local] = key
        owners = param.__dict__.setdefault("_ds_owners", [])
        owners[:] = [o for o in owners if o() is not None and o() is not self] + [weakref.ref(self)]
        if len(owners) > 1 and not getattr(self, "_ds_tied_hook", False):
            # [Note: tied shards] a second module holding the same shard (an output head tied to the
            # embedding) saves its own copy: checkpoint files store tensors sharing memory once, and a
            # per-rank file would otherwise lose one of the names
            self._ds_tied_hook = True
            self._register_state_dict_hook(_copy_tied_shards)

    def __getattr__(self, name: str):
        names = self.__dict__.get("_shard_names")
        if names and name in names:
            return self._parameters[names[name]]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("_tp_locals", ()) and (value is None or isinstance(value, nn.Parameter)):
            self._set_shard(name, value)
        else:
            super().__setattr__(name, value)


def use_shard_names(model: nn.Module, on: bool = True) -> nn.Module:
    """Register every tensor-parallel shard of ``model`` under its shard key (``on=False``: its own name)."""
    for module in model.modules():
        if isinstance(module, _ShardNamed) and module.tp.size > 1 and module.__dict__.get("_shard_named") != on:
            module.__dict__["_shard_named"] = on
            for local in sorted(module.__dict__.get("_tp_locals", ())):
                module._set_shard(local, getattr(module, local))
    return model


def _copy_tied_shards(module, state_dict, prefix, local_metadata):
    for key, p in module._parameters.items():
        owners = getattr(p, "_ds_owners", ())
        if p is not None and len(owners) > 1 and owners[0]() is not module and prefix + key in state_dict:
            state_dict[prefix + key] = state_dict[prefix + key].clone()


def _mark(param: nn.Parameter, info: ShardInfo, group: TensorGroup) -> nn.Parameter:
    param.ds_tp = info
    if info.replicated:
        # every rank holds these rows but back-propagates only its own heads through them
        sum_gradient_over(param, group, "tensor")
    else:
        _seam.tag_tensor_sharded(param, group)
    return param


class ColumnParallelLinear(_ShardNamed, nn.Module):
    """``y = x Wᵀ + b`` with the output features split over the tensor group.

    ``parts`` describe the output (default: one :class:`~ds_parallel.shards.Part` of
    ``out_features`` rows); see :mod:`ds_parallel.shards` for fused projections and replicated KV
    heads. The input is replicated (Megatron's ``f`` sums its gradient). ``gather_output=True``
    returns the full output on every rank (in the full layout, whatever the parts); otherwise this
    rank's features. ``conv1d=True`` stores the weight as ``[in, out]`` (GPT-2's ``Conv1D``).
    """

    def __init__(self, in_features: int, out_features: int | None = None, bias: bool = True, *,
                 group: TensorGroup | None = None, parts=None, gather_output: bool = False,
                 conv1d: bool = False, weight: torch.Tensor | None = None, bias_tensor: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, device=None, reuse_params: bool = False) -> None:
        super().__init__()
        self.tp = group or TensorGroup()
        if parts is None:
            if out_features is None:
                raise ConfigError("ColumnParallelLinear needs out_features or parts")
            parts = (Part(out_features, 1, "output features"),)
        parts = tuple(parts)
        full = sum(p.size for p in parts)
        if out_features is not None and out_features != full:
            raise ConfigError(f"ColumnParallelLinear: parts add up to {full} output features, not {out_features}")
        self.parts = parts
        self.spec: ColumnSpec = column_spec(parts, self.tp.size, self.tp.rank)
        self.in_features, self.full_out = in_features, full
        self.out_features = self.spec.local
        self.gather_output = gather_output
        self.conv1d = conv1d
        dtype = dtype or (weight.dtype if weight is not None else torch.get_default_dtype())
        wdim = 1 if conv1d else 0
        full_w = (in_features, full) if conv1d else (full, in_features)

        def wshape(rows):
            return (in_features, rows) if conv1d else (rows, in_features)

        spec = self.spec
        self.weight_replicated = self.bias_replicated = None
        sources = []
        if spec.shard_runs:
            sources.append(("weight", "bias", spec.shard_runs, spec.shard_rows, False))
        if spec.rep_runs:
            names = ("weight_replicated", "bias_replicated") if spec.shard_runs else ("weight", "bias")
            sources.append((*names, spec.rep_runs, spec.rep_rows, True))
        # every slice is taken before any parameter changes ([Note: parameter identity])
        slices = [(_slice(weight, wdim, runs, dtype, device), _slice(bias_tensor, 0, runs, dtype, device) if bias else None)
                  for _, _, runs, _, _ in sources]
        for i, ((wname, bname, runs, rows, replicated), (w_local, b_local)) in enumerate(zip(sources, slices)):
            w = _param(w_local, weight, wshape(rows), dtype, device, reuse_params and i == 0)
            self._set_shard(wname, _mark(w, ShardInfo("weight", wdim, full_w, runs, replicated), self.tp))
            if bias:
                b = _param(b_local, bias_tensor, (rows,), dtype, device, reuse_params and i == 0)
                self._set_shard(bname, _mark(b, ShardInfo("bias", 0, (full,), runs, replicated), self.tp))
            else:
                setattr(self, bname, None)
        if not bias:
            self.bias = None
        self._sources = [s[:2] for s in sources]
        self._gather_index: torch.Tensor | None = None
        # True when the module feeding this layer applies ``f`` once for several column layers
        self.input_synced = False
        install_shard_keys(self)

    @classmethod
    def from_dense(cls, module: nn.Module, group: TensorGroup | None = None, parts=None,
                   gather_output: bool = False, reuse_params: bool = False) -> ColumnParallelLinear:
        """Shard an ``nn.Linear`` (or a subclass, or GPT-2's ``Conv1D``); meta weights stay meta.
        ``reuse_params``: the module's parameter objects take the shards ([Note: parameter identity])."""
        conv = is_conv1d(module)
        w = module.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if conv else (w.shape[1], w.shape[0])
        return cls(in_f, out_f, module.bias is not None, group=group, parts=parts, gather_output=gather_output,
                   conv1d=conv, weight=w, bias_tensor=module.bias, dtype=w.dtype, device=w.device,
                   reuse_params=reuse_params)

    # -- forward -----------------------------------------------------------------------------------
    def _local_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's weight and bias in output order (the shard itself when nothing is replicated)."""
        spec = self.spec
        if spec.simple:
            return self.weight, self.bias
        sources = {0: self._sources[0] if spec.shard_runs else None, 1: self._sources[-1]}
        dim = 1 if self.conv1d else 0
        ws, bs = [], []
        for src, start, length in spec.order:
            wname, bname = sources[src]
            ws.append(getattr(self, wname).narrow(dim, start, length))
            b = getattr(self, bname)
            if b is not None:
                bs.append(b.narrow(0, start, length))
        w = ws[0] if len(ws) == 1 else torch.cat(ws, dim)
        b = None if not bs else (bs[0] if len(bs) == 1 else torch.cat(bs))
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_synced:
            x = copy_to_group(x, self.tp)
        w, b = self._local_weight()
        y = F.linear(x, w.t() if self.conv1d else w, b)
        if self.gather_output and self.tp.size > 1:
            y = self._gather(y)
        return y

    def _gather(self, y: torch.Tensor) -> torch.Tensor:
        specs = [column_spec(self.parts, self.tp.size, r) for r in range(self.tp.size)]
        sizes = tuple(s.local for s in specs)
        out = gather_from_group(y, self.tp, sizes if len(set(sizes)) > 1 else None)
        starts = [0]
        for s in specs:
            starts.append(starts[-1] + s.local)
        if all(s.simple and s.shard_runs == ((starts[r], s.local),) for r, s in enumerate(specs)):
            return out  # the ranks' outputs, concatenated, are already the full layout
        if self._gather_index is None or self._gather_index.device != y.device:
            self._gather_index = _full_order_index(specs).to(y.device)
        return out.index_select(-1, self._gather_index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} of {self.full_out}, "
                f"tp={self.tp.size}, rank={self.tp.rank}, gather_output={self.gather_output}"
                + (", conv1d" if self.conv1d else ""))


def _full_order_index(specs: list[ColumnSpec]) -> torch.Tensor:
    """For each full output row, its position in the ranks' concatenated local outputs."""
    where = torch.full((specs[0].full,), -1, dtype=torch.long)
    base = 0
    for spec in specs:
        pos = base
        rows = [r for run in spec.shard_runs for r in range(run[0], run[0] + run[1])]
        reps = [r for run in spec.rep_runs for r in range(run[0], run[0] + run[1])]
        for src, start, length in spec.order:
            full_rows = (rows if src == 0 else reps)[start:start + length]
            for i, r in enumerate(full_rows):
                if where[r] < 0:
                    where[r] = pos + i
            pos += length
        base += spec.local
    if (where < 0).any():
        raise AssertionError("tensor-parallel shards do not cover every output row")
    return where


class RowParallelLinear(_ShardNamed, nn.Module):
    """``y = x Wᵀ + b`` with the input features split over the tensor group.

    Each rank multiplies its slice of the input; the partial sums are added with one all-reduce
    (Megatron's ``g``) and the bias, held in full by every rank, is added once after it.
    ``input_is_parallel=False`` takes a replicated input and keeps this rank's slice first.
    ``unit`` keeps whole heads together (the attention output projection uses ``head_dim``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 group: TensorGroup | None = None, input_is_parallel: bool = True, unit: int = 1,
                 conv1d: bool = False, weight: torch.Tensor | None = None, bias_tensor: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, device=None, reuse_params: bool = False) -> None:
        super().__init__()
        self.tp = group or TensorGroup()
        self.full_in, self.out_features = in_features, out_features
        start, length = even_run(in_features, self.tp.size, self.tp.rank, unit, "row-parallel input features")
        self.in_features = length
        self.input_is_parallel = input_is_parallel
        self.conv1d = conv1d
        dtype = dtype or (weight.dtype if weight is not None else torch.get_default_dtype())
        wdim = 0 if conv1d else 1
        shape = (length, out_features) if conv1d else (out_features, length)
        full_w = (in_features, out_features) if conv1d else (out_features, in_features)
        w = _new_param(weight, shape, wdim, [(start, length)], dtype, device, reuse_params)
        self._set_shard("weight", _mark(w, ShardInfo("weight", wdim, full_w, ((start, length),)), self.tp))
        if bias:
            self.bias = _new_param(bias_tensor, (out_features,), 0, [(0, out_features)], dtype, device, reuse_params)
        else:
            self.bias = None
        install_shard_keys(self)

    @classmethod
    def from_dense(cls, module: nn.Module, group: TensorGroup | None = None, unit: int = 1,
                   input_is_parallel: bool = True, reuse_params: bool = False) -> RowParallelLinear:
        conv = is_conv1d(module)
        w = module.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if conv else (w.shape[1], w.shape[0])
        return cls(in_f, out_f, module.bias is not None, group=group, input_is_parallel=input_is_parallel,
                   unit=unit, conv1d=conv, weight=w, bias_tensor=module.bias, dtype=w.dtype, device=w.device,
                   reuse_params=reuse_params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.tp)
        y = F.linear(x, self.weight.t() if self.conv1d else self.weight)
        y = reduce_from_group(y, self.tp, inplace=True)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} of {self.full_in}, out_features={self.out_features}, "
                f"tp={self.tp.size}, rank={self.tp.rank}, input_is_parallel={self.input_is_parallel}"
                + (", conv1d" if self.conv1d else ""))


class VocabParallelEmbedding(_ShardNamed, nn.Embedding):
    """An embedding whose vocabulary rows are split over the tensor group.

    Each rank looks up the tokens in its range (others read as zeros) and one all-reduce adds the
    ranks' results. A vocabulary that does not divide is split into nearly equal pieces.
    Subclasses of ``nn.Embedding`` with their own ``forward`` (Gemma's scaled embedding) keep it:
    :meth:`from_embedding` mixes this class beneath theirs, so their ``super().forward`` lands here.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 group: TensorGroup | None = None, weight: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, device=None, reuse_params: bool = False) -> None:
        nn.Module.__init__(self)
        self._init_shard(num_embeddings, embedding_dim, padding_idx, group, weight, dtype, device, reuse_params)

    def _init_shard(self, num_embeddings, embedding_dim, padding_idx, group, weight, dtype, device,
                    reuse_params: bool = False) -> None:
        self.tp = group or TensorGroup()
        sizes = vocab_sizes(num_embeddings, self.tp.size)
        self.vocab_start = sum(sizes[:self.tp.rank])
        self.vocab_end = self.vocab_start + sizes[self.tp.rank]
        self.full_vocab = num_embeddings
        self.num_embeddings = sizes[self.tp.rank]
        self.embedding_dim = embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.full_padding_idx = padding_idx
        local_pad = padding_idx - self.vocab_start if padding_idx is not None and \
            self.vocab_start <= padding_idx < self.vocab_end else None
        self.padding_idx = local_pad
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        dtype = dtype or (weight.dtype if weight is not None else torch.get_default_dtype())
        run = ((self.vocab_start, self.num_embeddings),)
        w = _new_param(weight, (self.num_embeddings, embedding_dim), 0, run, dtype, device, reuse_params)
        self._set_shard("weight", _mark(w, ShardInfo("weight", 0, (num_embeddings, embedding_dim), run), self.tp))
        install_shard_keys(self)

    @classmethod
    def from_embedding(cls, module: nn.Embedding, group: TensorGroup | None = None,
                       reuse_params: bool = False) -> nn.Embedding:
        """Shard ``module`` (an ``nn.Embedding`` or subclass), keeping its class's own forward."""
        if getattr(module, "max_norm", None) is not None or getattr(module, "sparse", False):
            raise ConfigError("a vocabulary-parallel embedding supports neither max_norm nor sparse gradients; "
                              "keep this embedding replicated with a plan override")
        w = module.weight
        if type(module) is nn.Embedding or isinstance(module, VocabParallelEmbedding):
            return cls(w.shape[0], w.shape[1], module.padding_idx, group=group, weight=w, dtype=w.dtype,
                       device=w.device, reuse_params=reuse_params)
        base = type(module)
        mixed = _MIXED.get(base)
        if mixed is None:
            mixed = _MIXED[base] = type(f"VocabParallel{base.__name__}", (base, cls), {"__module__": __name__})
        del module._parameters["weight"]
        module.__class__ = mixed
        module._init_shard(w.shape[0], w.shape[1], module.padding_idx, group, w, w.dtype, w.device, reuse_params)
        return module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input, self.weight, self.padding_idx)
        outside = (input < self.vocab_start) | (input >= self.vocab_end)
        local = (input - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self.padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.tp, inplace=True)

    def extra_repr(self) -> str:
        return (f"vocabulary rows {self.vocab_start}:{self.vocab_end} of {self.full_vocab}, "
                f"embedding_dim={self.embedding_dim}, tp={self.tp.size}")


_MIXED: dict[type, type] = {}


def lm_head(module: nn.Module, group: TensorGroup | None = None, gather_output: bool = True) -> ColumnParallelLinear:
    """An output head (vocabulary rows split like :class:`VocabParallelEmbedding`'s)."""
    w = module.weight
    return ColumnParallelLinear.from_dense(module, group, parts=(VocabPart(w.shape[0]),), gather_output=gather_output)
