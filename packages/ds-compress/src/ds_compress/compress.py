"""DeepSpeed-compatible compression training: ``init_compression``, the schedule, ``redundancy_clean``.

``init_compression(model, config, teacher_model=None)`` reads the ``compression_training`` section,
builds the student for ``layer_reduction``, replaces every module a group names by a
compression-aware layer (:mod:`ds_compress.layers`) with its techniques enabled, and attaches a
:class:`CompressionScheduler`. The schedule is a function of the global training step: each
technique switches on at its ``schedule_offset`` (the engine advances it from
``engine.global_steps``; a plain PyTorch loop calls ``compression_scheduler(model).step()``).
``redundancy_clean(model, config)`` then bakes quantization and masks into the weights and removes
what structured pruning dropped: rows of the pruned layer with the matching inputs of its related
layers, attention heads (output-projection columns with the query/key/value rows), conv channels.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .config import CompressionTrainingConfig, parse_compression_config
from .errors import CompressionError
from .layers import CompressedConv2d, CompressedLinear
from .matching import match_modules, set_module

__all__ = ["init_compression", "redundancy_clean", "student_initialization", "CompressionScheduler",
           "compression_scheduler"]

log = logging.getLogger("ds_compress")

METHODS = ("weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning",
           "head_pruning", "channel_pruning")
TYPES = {"weight_quantization": (nn.Linear, nn.Conv2d), "activation_quantization": (nn.Linear, nn.Conv2d),
         "sparse_pruning": (nn.Linear, nn.Conv2d), "row_pruning": (nn.Linear,),
         "head_pruning": (nn.Linear,), "channel_pruning": (nn.Conv2d,)}
HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "heads")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "embed_dim_attn")


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # an engine or DDP wrapper
    return inner if isinstance(inner, nn.Module) else model


def _compressed(model: nn.Module, name: str) -> CompressedLinear | CompressedConv2d:
    m = model.get_submodule(name)
    if isinstance(m, (CompressedLinear, CompressedConv2d)):
        return m
    layer = CompressedLinear(m) if isinstance(m, nn.Linear) else CompressedConv2d(m)
    set_module(model, name, layer)
    return layer


def _groups(model, method: str, section) -> list[tuple[str, Any, list[str], list[list[str]]]]:
    """(group name, params, matched modules, matched related modules per related pattern)."""
    out = []
    claimed: dict[str, str] = {}
    shared = section.shared_parameters
    groups = dict(section.different_groups)
    exclude = getattr(shared, "excluded_modules", []) or []
    if not groups and getattr(shared, "method", None) == "snip_momentum":
        from .config import PruneGroup

        groups = {"all": PruneGroup(params={"dense_ratio": shared.dense_ratio})}
    for gname, group in groups.items():
        where = f"compression_training.{method}.different_groups.{gname}"
        names = match_modules(model, group.modules, TYPES[method], where, exclude)
        for n in names:
            if n in claimed:
                raise CompressionError(f"{where}: module {n!r} is already in group {claimed[n]!r} of {method}; a "
                                       f"module belongs to one group per method: narrow the patterns")
            claimed[n] = gname
        related: list[list[str]] = []
        if group.related_modules:
            for patterns in group.related_modules:
                for pattern in patterns:
                    hits = match_modules(model, [pattern], (nn.Linear, nn.Conv2d, nn.BatchNorm2d), f"{where}.related_modules")
                    if len(hits) != len(names):
                        raise CompressionError(
                            f"{where}.related_modules: pattern {pattern!r} matches {len(hits)} modules but the "
                            f"group's modules match {len(names)}; related modules pair with the pruned modules "
                            f"in model order, one each")
                    related.append(hits)
        out.append((gname, group.params, names, related))
    return out


def _check_heads(model, name: str, num_heads: int, related: list[list[str]], index: int) -> None:
    """The head count must be the model's: look at the attention module around the projections."""
    owners = [name] + [r[index] for r in related]
    parents = {o.rpartition(".")[0] for o in owners}
    for parent in sorted(parents, key=len):
        while True:
            mod = model.get_submodule(parent) if parent else model
            for attr in HEAD_ATTRS:
                value = getattr(mod, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    if num_heads != value:
                        raise CompressionError(
                            f"head_pruning: num_heads={num_heads} but {parent or 'the model'}.{attr} is {value}; "
                            f"set shared_parameters.num_heads to the model's {value} heads")
                    return
            if not parent:
                break
            parent = parent.rpartition(".")[0]


def init_compression(model: nn.Module, deepspeed_config: Any, teacher_model: nn.Module | None = None,
                     mpu: Any = None) -> nn.Module:
    """Prepare ``model`` for compression training as the config's ``compression_training`` says.

    ``deepspeed_config``: a DeepSpeed config (dict, JSON string, file path) or the section itself.
    ``teacher_model``: the model whose layers seed a reduced student (``layer_reduction``); when
    omitted the student is built from the model's own layers. ``mpu`` is accepted for compatibility
    (tensor-parallel layers are not compressed). Returns the model (changed in place).
    """
    cfg = parse_compression_config(deepspeed_config)
    target = _unwrap(model)
    if cfg.layer_reduction.enabled:
        student_initialization(target, teacher_model, cfg)

    for method in METHODS:
        section = getattr(cfg, method)
        shared = section.shared_parameters
        if not shared.enabled:
            continue
        for _group_name, params, names, related in _groups(target, method, section):
            for i, name in enumerate(names):
                layer = _compressed(target, name)
                if method == "weight_quantization":
                    mixed = shared.fp16_mixed_quantize
                    layer.enable_weight_quantization(params.start_bits, params.target_bits, params.quantization_period,
                                                     shared.quantization_type == "symmetric",
                                                     shared.rounding == "stochastic", shared.quantize_groups,
                                                     mixed.quantize_change_ratio if mixed.enabled else None, name)
                elif method == "activation_quantization":
                    layer.enable_activation_quantization(params.bits, shared.quantization_type == "symmetric",
                                                         shared.range_calibration == "static")
                elif method == "sparse_pruning":
                    layer.enable_sparse_pruning(params.dense_ratio, shared.method, shared.block_pattern)
                elif method == "row_pruning":
                    layer.enable_row_pruning(params.dense_ratio, shared.method)
                elif method == "head_pruning":
                    _check_heads(target, name, shared.num_heads, related, i)
                    layer.enable_head_pruning(params.dense_ratio, shared.method, shared.num_heads, name)
                else:
                    layer.enable_channel_pruning(params.dense_ratio, shared.method)
                    for hits in related:  # a BatchNorm between two convs: mask its output too, so
                        bn = target.get_submodule(hits[i])  # a pruned channel contributes nothing
                        if isinstance(bn, nn.BatchNorm2d):
                            layer.bn_hooks.append(bn.register_forward_hook(
                                lambda _m, _i, out, layer=layer: _mask_channels(layer, out)))
    scheduler = CompressionScheduler(target, cfg)
    object.__setattr__(target, "_ds_compression", scheduler)  # not a submodule: no state of its own
    scheduler.set_step(0)
    return model


def compression_scheduler(model: nn.Module) -> CompressionScheduler:
    """The scheduler ``init_compression`` attached to ``model``."""
    scheduler = getattr(_unwrap(model), "_ds_compression", None)
    if scheduler is None:
        raise CompressionError("the model has no compression schedule; call ds_compress.init_compression(model, "
                               "config) first")
    return scheduler


class CompressionScheduler:
    """Switches each technique on at its ``schedule_offset`` and sets the weight bits (MoQ schedule).

    ``set_step(n)`` puts every layer in the state of training step ``n`` (idempotent; masks computed
    when a technique starts are kept); ``step()`` advances by one step like DeepSpeed's scheduler.
    """

    def __init__(self, model: nn.Module, config: CompressionTrainingConfig) -> None:
        self.model = model
        self.config = config
        self.training_steps = 0
        sp = config.sparse_pruning.shared_parameters
        self.offsets = {m: getattr(config, m).shared_parameters.schedule_offset for m in METHODS}
        self.sparse_end = sp.schedule_offset_end
        self.sparse_stride = sp.schedule_offset_stride
        self._announced: set[str] = set()

    def layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, (CompressedLinear, CompressedConv2d))]

    def set_step(self, step: int) -> None:
        self.training_steps = int(step)
        for _, layer in self.layers():
            layer.set_step(self.training_steps, self.offsets, self.sparse_end, self.sparse_stride)
        for method, offset in self.offsets.items():
            if getattr(self.config, method).shared_parameters.enabled and step >= offset and method not in self._announced:
                self._announced.add(method)
                log.info("%s is enabled at step %d", method, step)

    def step(self, step_zero_check: bool = False) -> None:
        self.set_step(self.training_steps + (0 if step_zero_check else 1))


# -- layer reduction ---------------------------------------------------------------------------

def _layer_list(model: nn.Module, prefix: str, who: str) -> nn.ModuleList:
    try:
        layers = model.get_submodule(prefix)
    except AttributeError:
        raise CompressionError(f"layer_reduction: module_name_prefix {prefix!r} names no module of the {who}; "
                               f"give the layer list's name, e.g. 'bert.encoder.layer' or 'transformer.h'") from None
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise CompressionError(f"layer_reduction: {prefix!r} in the {who} is a {type(layers).__name__}, not a "
                               f"list of layers (nn.ModuleList)")
    return layers


def student_initialization(student: nn.Module, teacher: nn.Module | None, config: Any) -> nn.Module:
    """Make ``student`` a ``keep_number_layer``-layer model whose layer ``i`` is teacher layer
    ``teacher_layer[i]``, and copy ``other_module_name`` modules (embeddings, head) from the teacher."""
    cfg = parse_compression_config(config).layer_reduction
    student = _unwrap(student)
    teacher = copy.deepcopy(student) if teacher is None else _unwrap(teacher)
    t_layers = _layer_list(teacher, cfg.module_name_prefix, "teacher")
    for t in cfg.teacher_layer:
        if not 0 <= t < len(t_layers):
            raise CompressionError(f"layer_reduction: teacher_layer {t} is out of range: the teacher has "
                                   f"{len(t_layers)} layers under {cfg.module_name_prefix!r} (0..{len(t_layers) - 1})")
    s_layers = _layer_list(student, cfg.module_name_prefix, "student")
    keep = cfg.keep_number_layer
    if len(s_layers) < keep:
        raise CompressionError(f"layer_reduction: keep_number_layer {keep} but the student has only "
                               f"{len(s_layers)} layers; build the student with at least {keep}")
    if len(s_layers) > keep:
        s_layers = type(s_layers)(*list(s_layers)[:keep]) if isinstance(s_layers, nn.Sequential) \
            else nn.ModuleList(list(s_layers)[:keep])
        set_module(student, cfg.module_name_prefix, s_layers)
        for holder in (student, getattr(student, "config", None), getattr(student, "cfg", None)):
            for attr in ("num_hidden_layers", "n_layer", "num_layers", "layers"):
                if holder is not None and isinstance(getattr(holder, attr, None), int):
                    setattr(holder, attr, keep)
    for i, t in enumerate(cfg.teacher_layer):
        _copy_module(s_layers[i], t_layers[t], f"{cfg.module_name_prefix}.{i} <- {cfg.module_name_prefix}.{t}")
    for name in cfg.other_module_name:
        try:
            s_mod, t_mod = student.get_submodule(name), teacher.get_submodule(name)
        except AttributeError:
            raise CompressionError(f"layer_reduction: other_module_name {name!r} is not a module of both the "
                                   f"student and the teacher") from None
        _copy_module(s_mod, t_mod, name)
    return student


def _copy_module(dst: nn.Module, src: nn.Module, what: str) -> None:
    theirs = src.state_dict()
    mine = dst.state_dict()
    bad = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if bad:
        raise CompressionError(f"layer_reduction: cannot copy {what}: tensors {bad[:3]} differ between student "
                               f"and teacher; student layers must have the teacher's layer shape")
    dst.load_state_dict(theirs)


# -- redundancy_clean --------------------------------------------------------------------------

def _keep_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight = nn.Parameter(bn.weight.data[keep].clone())
            bn.bias = nn.Parameter(bn.bias.data[keep].clone())
        if bn.running_mean is not None:
            bn.running_mean = bn.running_mean[keep].clone()
            bn.running_var = bn.running_var[keep].clone()
    bn.num_features = int(keep.sum())


def _mask_channels(layer, out: torch.Tensor) -> torch.Tensor:
    if layer.row is None or not layer.row_on:
        return out
    return out * layer._row_mask_now().view(1, -1, 1, 1).to(out.dtype)


def _keep_inputs(model, name: str, keep: torch.Tensor) -> None:
    m = model.get_submodule(name)
    if isinstance(m, nn.BatchNorm2d):
        _keep_bn(m, keep)
        return
    layer = _compressed(model, name)
    layer.keep_columns(keep)


def _set_heads(model, names: list[str], old_heads: int, new_heads: int, old_width: int, new_width: int) -> None:
    parents = {n.rpartition(".")[0] for n in names}
    for parent in parents:
        mod = model.get_submodule(parent) if parent else model
        for _ in range(2):  # the projections' module and its parent (attention.self / attention)
            for attr in HEAD_ATTRS:
                if getattr(mod, attr, None) == old_heads and not isinstance(getattr(mod, attr), bool):
                    setattr(mod, attr, new_heads)
            for attr in WIDTH_ATTRS:
                if getattr(mod, attr, None) == old_width:
                    setattr(mod, attr, new_width)
            parent = parent.rpartition(".")[0]
            mod = model.get_submodule(parent) if parent else model


def redundancy_clean(model: nn.Module, deepspeed_config: Any, mpu: Any = None) -> nn.Module:
    """Bake the compression into the model and remove what structured pruning dropped.

    Quantized weights are replaced by their quantized values (the layer remembers the grid, so
    ``save_quantized`` stores them exactly), sparse masks are multiplied in, pruned rows / heads /
    channels are removed from the pruned layer and from its related layers, so the model really has
    fewer parameters and computes what the masked model computed. Layers left with nothing to do
    become plain ``nn.Linear`` / ``nn.Conv2d``. Returns the model.
    """
    cfg = parse_compression_config(deepspeed_config)
    target = _unwrap(model)
    scheduler = getattr(target, "_ds_compression", None)
    for _, layer in [(n, m) for n, m in target.named_modules() if isinstance(m, (CompressedLinear, CompressedConv2d))]:
        layer.fix()  # weight quantization, then sparse masks (DeepSpeed's order)

    for method in ("row_pruning", "head_pruning", "channel_pruning"):
        section = getattr(cfg, method)
        if not section.shared_parameters.enabled:
            continue
        for _, _, names, related in _groups(target, method, section):
            for i, name in enumerate(names):
                layer = target.get_submodule(name)
                if not isinstance(layer, (CompressedLinear, CompressedConv2d)):
                    continue
                if method == "head_pruning":
                    if layer.head is None:
                        continue
                    heads = layer.head["num_heads"]
                    keep_heads = layer.kept_heads() if layer.head_on else torch.ones(heads, dtype=torch.bool)
                    per = layer.in_features // heads
                    keep = keep_heads.repeat_interleave(per)
                    layer.drop_head_state()
                    if not related:
                        with torch.no_grad():
                            layer.weight.data.mul_(keep.to(layer.weight.dtype)[None, :])
                        continue
                    old_width = layer.in_features
                    layer.keep_columns(keep)
                    for hits in related:
                        _compressed(target, hits[i]).keep_rows(keep)
                    _set_heads(target, [name] + [h[i] for h in related], heads, int(keep_heads.sum()),
                               old_width, int(keep.sum()))
                else:
                    if layer.row is None:
                        continue
                    keep = layer.kept_rows() if layer.row_on else torch.ones(layer.weight.shape[0], dtype=torch.bool)
                    if not related:
                        with torch.no_grad():
                            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
                            layer.weight.data.mul_(keep.to(layer.weight.dtype).view(shape))
                            if layer.bias is not None:
                                layer.bias.data.mul_(keep.to(layer.bias.dtype))
                        layer._drop("row", ("row_mask", "row_ready", "row_scores"))
                        continue
                    for hook in getattr(layer, "bn_hooks", []):
                        hook.remove()
                    layer.keep_rows(keep)
                    for hits in related:
                        _keep_inputs(target, hits[i], keep)

    for name, layer in [(n, m) for n, m in target.named_modules() if isinstance(m, (CompressedLinear, CompressedConv2d))]:
        for technique in ("row", "head"):  # structured masks without a schedule start: nothing was pruned
            if getattr(layer, technique) is not None:
                layer._drop(technique, (f"{technique}_mask", f"{technique}_ready", f"{technique}_scores"))
        if layer.aq is None and layer.fixed_quant is None:
            set_module(target, name, _plain(layer))
    if scheduler is not None:
        object.__setattr__(target, "_ds_compression", None)
    return model


def _plain(layer: nn.Module) -> nn.Module:
    if isinstance(layer, CompressedLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.weight.device, dtype=layer.weight.dtype)
    else:
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                          device=layer.weight.device, dtype=layer.weight.dtype)
    plain.weight = layer.weight
    if layer.bias is not None:
        plain.bias = layer.bias
    return plain
