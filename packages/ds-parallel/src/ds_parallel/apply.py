"""Turn a model into its tensor-parallel shard: :func:`apply_plan` and :func:`tensor_parallel`.

Every check (module names, layer types, sizes that must divide) runs on every rank before anything
changes and before any collective, so a bad plan fails the same way everywhere instead of hanging.

The model's own attention code keeps working on a rank's heads: Hugging Face attention reshapes
with ``view(..., -1, head_dim)``, so head counts follow the sharded width, and the attributes that
still hold head counts (``num_heads``, ``num_key_value_groups``, GPT-2's ``split_size``, Phi-3's
``config.num_attention_heads`` read in forward) are set to this rank's values — the config through
a per-module view, since one config object is shared by every layer. Models with ALiBi (BLOOM,
Falcon with ``alibi=True``) build the biases for all heads; each attention module takes its rows.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn

from ds_core import comm
from ds_core.errors import ConfigError, closest

from .comm import TensorGroup, model_topology, tensor_group
from .grads import sum_gradient_over
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    is_conv1d,
    use_shard_names,
)
from .plan import AttentionHeads, TPPlan, find_plan
from .shards import Part, column_spec, even_run, kv_replication, vocab_sizes

__all__ = ["apply_plan", "tensor_parallel", "validate_plan"]


def _dims(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(m) else (w.shape[1], w.shape[0])


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m) or \
        (isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
         and type(m).__name__.endswith("Linear") and not isinstance(m, (ColumnParallelLinear, RowParallelLinear)))


def validate_plan(model: nn.Module, plan: TPPlan, tp: int) -> None:
    """Raise :class:`ConfigError` naming the module, the sizes and the fix if ``plan`` cannot shard
    ``model`` over ``tp`` ranks. Pure: no collective, no change."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for name, heads in plan.attention.items():
        kv_replication(heads.num_heads, heads.num_kv_heads, tp, f"attention module {name!r}")
        children = [n for n in plan.styles if n.startswith(f"{name}.") and "." not in n[len(name) + 1:]]
        gathered = [n for n in children if plan.styles[n].kind == "colwise" and plan.styles[n].gather_output]
        if gathered:
            raise ConfigError(f"attention module {name!r}: {gathered[0]} gathers its output while the plan shards "
                              f"the heads; drop the gather or keep the whole attention module replicated")
        attention_module = modules.get(name)
        if attention_module is not None and getattr(getattr(attention_module, "config", None), "pretraining_tp", 1) > 1 and \
                getattr(attention_module.config, "slow_but_exact", False):
            raise ConfigError(f"{name}: BLOOM's pretraining_tp > 1 with slow_but_exact reads the full dense weight; "
                              f"set config.slow_but_exact=False to shard it")
    for name, style in plan.styles.items():
        m = modules.get(name)
        if m is None:
            raise ConfigError(f"the tensor-parallel plan names module {name!r}, which {type(model).__name__} does "
                              f"not have{closest(name, names)}; fix the plan (module names look like "
                              f"{', '.join(names[:3])}, ...)")
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            raise ConfigError(f"module {name!r} is already tensor-parallel; apply a plan to an unsharded model once")
        if style.kind in ("colwise", "rowwise") and not _is_linear(m):
            raise ConfigError(f"the plan makes {name!r} {style.kind}, but it is a {type(m).__name__}, not a linear "
                              f"layer; use 'replicate' for it")
        if style.kind == "colwise":
            out = _dims(m)[1]
            parts = style.parts or (Part(out, 1, name),)
            total = sum(p.size for p in parts)
            if total != out:
                raise ConfigError(f"{name}: the plan's parts add up to {total} outputs but the layer has {out}")
            for r in range(tp):
                column_spec(parts, tp, r)
        elif style.kind == "rowwise":
            even_run(_dims(m)[0], tp, 0, style.unit, f"{name} (input features)")
        elif style.kind == "vocab_embedding":
            if not isinstance(m, nn.Embedding):
                raise ConfigError(f"the plan makes {name!r} a vocabulary-parallel embedding, but it is a "
                                  f"{type(m).__name__}; use 'replicate' for it")
            vocab_sizes(m.weight.shape[0], tp)
    holders: dict[int, list[tuple[str, str]]] = {}  # tied weights: who else holds a planned weight
    for mname, m in modules.items():
        for pname, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, pname))
    for holders_of in holders.values():
        planned = [h for h in holders_of if h[0] in plan.styles and h[1] == "weight"
                   and plan.styles[h[0]].kind not in ("replicate", "partial_grad")]
        if planned and len(planned) != len(holders_of):
            others = [f"{m}.{p}" for m, p in holders_of if (m, p) not in planned]
            raise ConfigError(f"{planned[0][0]}.weight is shared with {', '.join(others)}, which the plan leaves "
                              f"whole; shard both (e.g. a tied embedding and output head) or neither")


# -- attention fix-ups -------------------------------------------------------------------------------

class _LocalConfig:
    """A view of a shared model config with this rank's head counts (other reads and writes pass through)."""

    def __init__(self, base, **overrides) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_over", overrides)

    def __getattr__(self, name):
        if name.startswith("__") or "_over" not in self.__dict__:
            raise AttributeError(name)
        over = self.__dict__["_over"]
        return over[name] if name in over else getattr(self.__dict__["_base"], name)

    def __setattr__(self, name, value) -> None:
        if name in self._over:
            self._over[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"LocalConfig({self._over}, of {type(self._base).__name__})"


def _fix_attention(module: nn.Module, heads: AttentionHeads, tg: TensorGroup) -> None:
    tp, rank = tg.size, tg.rank
    h_local = heads.num_heads // tp
    copies, kv_local = kv_replication(heads.num_heads, heads.num_kv_heads, tp)
    for attr in ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, h_local)
    for attr in ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            # Falcon keeps num_kv_heads == num_heads for its layouts without grouped-query attention
            setattr(module, attr, h_local if value == heads.num_heads else kv_local)
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = h_local // kv_local
    if isinstance(getattr(module, "split_size", None), int):
        module.split_size = h_local * heads.head_dim
    if isinstance(getattr(module, "embed_dim", None), int) and module.embed_dim == heads.num_heads * heads.head_dim:
        module.embed_dim = h_local * heads.head_dim
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "num_attention_heads") and not isinstance(cfg, _LocalConfig):
        over = {"num_attention_heads": h_local}
        if hasattr(cfg, "num_key_value_heads"):
            over["num_key_value_heads"] = kv_local
        module.config = _LocalConfig(cfg, **over)
    module.ds_tp_heads = (heads, tp, rank)
    if heads.alibi:
        _slice_alibi(module, heads.num_heads, rank * h_local, h_local)


def _slice_alibi(module: nn.Module, num_heads: int, start: int, count: int) -> None:
    """ALiBi biases (and Falcon's masks, which fold them in) arrive for every head, as
    ``[batch * heads, 1, length]`` or ``[batch, heads, q, k]``; keep this rank's heads."""
    params = list(inspect.signature(module.forward).parameters)

    def take(t, flat: bool):
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() == 4 and t.shape[1] == num_heads:
            return t[:, start:start + count]
        if flat and t.dim() == 3 and t.shape[0] % num_heads == 0:
            return t.view(-1, num_heads, *t.shape[1:])[:, start:start + count].reshape(-1, *t.shape[1:])
        return t

    def hook(mod, args, kwargs):
        args = list(args)
        for name, flat in (("alibi", True), ("attention_mask", False)):
            if name in kwargs:
                kwargs[name] = take(kwargs[name], flat)
            elif name in params and len(args) > params.index(name):
                args[params.index(name)] = take(args[params.index(name)], flat)
        return tuple(args), kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)


# -- applying ----------------------------------------------------------------------------------------

def _broadcast_from_first(model: nn.Module, tg: TensorGroup) -> None:
    """Start every tensor rank from tensor rank 0's weights (replicated ones must agree exactly)."""
    src = dist.get_global_rank(tg.group, 0)
    with torch.no_grad():
        seen: set[int] = set()
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_meta or id(t) in seen:
                continue
            seen.add(id(t))
            comm.broadcast(t.data, src=src, group=tg.group)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_plan(model: nn.Module, plan: TPPlan, group=None, *, broadcast: bool = True,
               shard_names: bool = True) -> nn.Module:
    """Shard ``model`` in place by ``plan`` over ``group`` (a ``TensorGroup``, a process group, or
    ``None`` for the whole world); returns it.

    Materialized weights are sliced (after a broadcast from tensor rank 0 unless ``broadcast=False``,
    so replicated parameters agree exactly); weights on the meta device stay there, with this rank's
    shapes, for :func:`~ds_parallel.loading.load_sharded` to fill. ``shard_names``: register the shards
    under their shard keys (:func:`~ds_parallel.layers.use_shard_names`; what engine checkpoints need).
    """
    tg = group if isinstance(group, TensorGroup) else TensorGroup.of(group)
    validate_plan(model, plan, tg.size)
    if tg.size == 1:
        model.ds_tp_plan, model.ds_tp_group = plan, tg
        return model
    modules = dict(model.named_modules())
    if broadcast and tg.live:
        _broadcast_from_first(model, tg)
    replaced: dict[int, nn.Parameter] = {}  # id of an original weight -> its shard
    for name, style in plan.styles.items():
        m = modules[name]
        original = m._parameters.get("weight")
        # a weight tied to one already sharded holds the shard now ([Note: parameter identity]): the
        # module is built from a stand-in of the full shape and takes the tied shard below
        tied = original is not None and id(original) in replaced
        if tied:
            m._parameters["weight"] = nn.Parameter(torch.empty(replaced[id(original)].ds_tp.full_shape,
                                                               dtype=original.dtype, device="meta"))
        if style.kind == "colwise":
            new = ColumnParallelLinear.from_dense(m, tg, parts=style.parts or None, gather_output=style.gather_output,
                                                  reuse_params=True)
        elif style.kind == "rowwise":
            new = RowParallelLinear.from_dense(m, tg, unit=style.unit, input_is_parallel=not style.split_input,
                                               reuse_params=True)
        elif style.kind == "vocab_embedding":
            new = VocabParallelEmbedding.from_embedding(m, tg, reuse_params=True)
        else:  # partial_grad
            for p in m.parameters():
                sum_gradient_over(p, tg, "tensor")
            continue
        if new is not m:
            _set(model, name, new)
        if original is not None:
            if tied:
                if new.weight.ds_tp != replaced[id(original)].ds_tp:
                    raise ConfigError(f"{name}.weight is tied to a weight sharded differently; shard both as a "
                                      f"vocabulary (an embedding and its output head) or neither")
                new.weight = replaced[id(original)]  # keep the tie (an embedding and its output head)
            else:
                replaced[id(original)] = new.weight
    for name, heads in plan.attention.items():
        _fix_attention(modules[name], heads, tg)
    _share_input_sync(model, plan, tg)
    if shard_names:
        use_shard_names(model)
    model.ds_tp_plan, model.ds_tp_group = plan, tg
    return model


def _share_input_sync(model: nn.Module, plan: TPPlan, tg: TensorGroup) -> None:
    """One ``f`` per block input instead of one per column-parallel layer reading it.

    Q, K and V (and an MLP's gate and up) read the same input; each would all-reduce its own share of
    that input's gradient in backward. Applying ``f`` once where the input enters the attention or
    MLP module sums the shares locally first: one all-reduce instead of three (two). Only for modules
    whose only parameterised children reading the input are those column-parallel layers (the
    attention and MLP modules of the families the plans know).
    """
    parents: dict[str, list[str]] = {}
    for name, style in plan.styles.items():
        if style.kind == "colwise" and not style.gather_output and "." in name:
            parent, child = name.rsplit(".", 1)
            parents.setdefault(parent, []).append(child)
    for parent, children in parents.items():
        if len(children) < 2:
            continue
        module = model.get_submodule(parent)
        names = set(children)
        others = [n for n, m in module.named_children() if n not in names and any(True for _ in m.parameters())]
        rows = [n for n in others if plan.styles.get(f"{parent}.{n}", None) is not None
                and plan.styles[f"{parent}.{n}"].kind in ("rowwise", "partial_grad")]
        if set(others) - set(rows):
            continue  # something else may read the input: keep one f per layer
        for child in children:
            module.get_submodule(child).input_synced = True
        module.register_forward_pre_hook(_sync_first_input(tg), with_kwargs=True)


def _sync_first_input(tg: TensorGroup):
    from .comm import copy_to_group

    def hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (copy_to_group(args[0], tg), *args[1:]), kwargs
        for key in ("hidden_states", "x", "input", "hidden"):
            if isinstance(kwargs.get(key), torch.Tensor):
                kwargs[key] = copy_to_group(kwargs[key], tg)
                return args, kwargs
        raise ConfigError(f"{type(module).__name__}: cannot find the input tensor its column-parallel layers read")

    return hook


def tensor_parallel(model: nn.Module, tp_size: int | None = None, group=None, *, topology=None,
                    plan: TPPlan | None = None,
                    overrides: dict | None = None, broadcast: bool = True, shard_names: bool = True,
                    **find_kwargs) -> nn.Module:
    """Find ``model``'s plan and shard it (DeepSpeed's ``tp_model_init``).

    The group is, in order: ``group``; the ``tensor`` axis of ``topology``; of the model's own topology
    (``model.ds_topology``, from an earlier call) or, with ``tp_size``, of a topology with
    ``tensor=tp_size`` over the launched world, which is recorded as ``model.ds_topology`` so that
    ``ds_core.initialize`` lays the run out on it; else every launched rank (``tp_size`` None), or one
    process.
    ``find_kwargs`` go to :func:`~ds_parallel.plan.find_plan` (e.g. ``vocab_parallel_head=True``).
    """
    if group is None:
        if topology is not None:
            if tp_size is not None and tp_size != topology.size("tensor"):
                raise ConfigError(f"tp_size={tp_size} but the topology has tensor={topology.size('tensor')}; "
                                  f"use one size")
            group = tensor_group(topology)
        elif tp_size is not None and tp_size > 1 or getattr(model, "ds_topology", None) is not None:
            group = tensor_group(model_topology(model, tensor=tp_size or 1))
        elif tp_size is None and comm.is_initialized() and comm.get_world_size() > 1:
            group = tensor_group(model_topology(model, tensor=comm.get_world_size()))
        else:
            group = TensorGroup()
    tg = group if isinstance(group, TensorGroup) else TensorGroup.of(group)
    if plan is None:
        plan = find_plan(model, overrides, **find_kwargs)
    elif overrides:
        raise ConfigError("pass plan= or overrides=, not both (overrides refine a found plan)")
    return apply_plan(model, plan, tg, broadcast=broadcast, shard_names=shard_names)
