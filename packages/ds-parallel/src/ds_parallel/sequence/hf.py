"""Ulysses for Hugging Face models: register once, train a stock model with its sequence split.

:func:`sequence_parallel` does, for a ``transformers`` model (Llama, Qwen, Mistral, ... — any model
that calls its attention through ``ALL_ATTENTION_FUNCTIONS``):

- registers ``"ds_ulysses"`` with transformers' ``AttentionInterface``: all-to-alls around the
  model's own attention function (``sdpa`` by default), which then sees full sequences of ``h/p``
  heads — ALST's approach;
- switches the model to it (``model.set_attn_implementation``). transformers builds no mask for an
  implementation it does not know, so attention is the module's own causal attention over the whole
  sequence; padding must be at the end (see :mod:`ds_parallel.sequence.data`);
- wraps ``model.loss_function`` so the loss is the mean over the valid tokens of the whole sequence
  group (labels shifted before sharding, ``shift_labels``);
- sums every parameter's gradient over the sequence group (each rank saw a slice of the tokens).

Plain ``nn.Module`` models use :class:`~ds_parallel.sequence.ulysses.DistributedAttention` in their
own attention and call :func:`sequence_parallel` for the gradient sums.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_core import comm
from ds_core.errors import ConfigError

from ..comm import TensorGroup, model_topology
from ..grads import sum_gradient_over
from .data import IGNORE_INDEX, sequence_parallel_loss
from .ulysses import replicate_kv_heads, seq_all_to_all

__all__ = ["sequence_parallel", "register_ulysses_attention", "ATTENTION_NAME", "sequence_group"]

ATTENTION_NAME = "ds_ulysses"
_STATE: dict[str, object] = {}


class _ModuleView:
    """``module`` with a few attributes replaced (the local grouping of query to KV heads)."""

    def __init__(self, module, **overrides) -> None:
        self.__dict__["_module"] = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _ulysses(module, query, key, value, attention_mask, *args, **kwargs):
    """Attention function in transformers' interface: ``[b, h, s/p, d]`` in, ``[b, s/p, h, d]`` out."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    tg: TensorGroup = _STATE["group"]
    inner = ALL_ATTENTION_FUNCTIONS[_STATE["inner"]]
    comm_dtype = _STATE.get("comm_dtype")
    if attention_mask is not None:
        raise ConfigError("Ulysses attention computes the module's causal attention over the whole sequence and "
                          "takes no attention mask; pass position_ids and right-padded batches (labels -100 on "
                          "padding) — ds_parallel.shard_batch does")
    p = tg.size
    if p > 1:
        key = replicate_kv_heads(key, query.shape[1], p, 1)
        value = replicate_kv_heads(value, query.shape[1], p, 1)
    q = seq_all_to_all(query, tg, 1, 2, comm_dtype)  # [b, h/p, s, d]
    k = seq_all_to_all(key, tg, 1, 2, comm_dtype)
    v = seq_all_to_all(value, tg, 1, 2, comm_dtype)
    view = _ModuleView(module, num_key_value_groups=q.shape[1] // k.shape[1])
    out, _ = inner(view, q, k, v, None, *args, **kwargs)  # [b, s, h/p, d]
    return seq_all_to_all(out, tg, 1, 2, comm_dtype), None  # [b, s/p, h, d]


def register_ulysses_attention(group=None, inner: str = "sdpa", comm_dtype: torch.dtype | None = None) -> str:
    """Register :data:`ATTENTION_NAME` with transformers' attention interface, over ``group``, around the
    attention function ``inner`` (``sdpa``, ``flash_attention_2``, ``flex_attention``, ...). Returns the name."""
    try:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as exc:  # pragma: no cover - the [hf] extra
        raise ConfigError("Ulysses attention for Hugging Face models needs transformers: "
                          "pip install 'ds-parallel[hf]'") from exc
    if inner == ATTENTION_NAME or inner not in ALL_ATTENTION_FUNCTIONS:
        raise ConfigError(f"inner attention {inner!r} is not one of transformers' attention functions "
                          f"({', '.join(k for k in ALL_ATTENTION_FUNCTIONS if k != ATTENTION_NAME)}); the eager "
                          f"path is per model: use 'sdpa' (the same computation)")
    _STATE.update(group=group if isinstance(group, TensorGroup) else TensorGroup.of(group), inner=inner,
                  comm_dtype=comm_dtype)
    AttentionInterface.register(ATTENTION_NAME, _ulysses)
    return ATTENTION_NAME


def sequence_group(topology=None) -> TensorGroup:
    """The ``sequence`` axis of ``topology`` as a TensorGroup (one process without a topology)."""
    if topology is None or topology.size("sequence") == 1:
        return TensorGroup()
    if not comm.is_initialized():
        return TensorGroup(topology.size("sequence"), 0)
    return TensorGroup(topology.size("sequence"), topology.rank("sequence"), topology.group("sequence"))


def _heads(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, query heads as this rank computes them) of every attention module."""
    out = []
    for name, m in model.named_modules():
        tp = getattr(m, "ds_tp_heads", None)
        if tp is not None:
            heads, size, _ = tp
            out.append((name, heads.num_heads // size))
        elif isinstance(getattr(m, "num_key_value_groups", None), int) and hasattr(m, "head_dim"):
            cfg = getattr(m, "config", None)
            h = getattr(cfg, "num_attention_heads", None)
            if isinstance(h, int):
                out.append((name, h))
    return out


def _wrap_loss(model: nn.Module, tg: TensorGroup) -> None:
    original = model.loss_function

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                      shift_labels=None, **kwargs):
        if shift_labels is None:
            raise ConfigError("under sequence parallelism the labels must be shifted before the sequence is cut: "
                              "pass shift_labels (ds_parallel.shard_batch / SequenceShardedLoader produce them)")
        local_sum = original(logits, labels, vocab_size, num_items_in_batch=1, ignore_index=ignore_index,
                             shift_labels=shift_labels, **kwargs)
        valid = (shift_labels != ignore_index).sum()
        return sequence_parallel_loss(local_sum, valid, tg, num_items_in_batch)

    loss_function.ds_sequence_parallel = True
    model.loss_function = loss_function


def sequence_parallel(model: nn.Module, sp_size: int | None = None, group=None, *, topology=None, inner: str = "sdpa",
                      comm_dtype: torch.dtype | None = None) -> nn.Module:
    """Make ``model`` train with its sequence split over the sequence group (see the module docstring).

    The group is ``group``, else the ``sequence`` axis of ``topology``, else of the model's own topology
    (``model.ds_topology``, e.g. from :func:`~ds_parallel.tensor_parallel`) or, with ``sp_size``, of a
    topology with ``sequence=sp_size`` (keeping the model's tensor size), recorded as
    ``model.ds_topology`` for ``ds_core.initialize``. Heads that the group size does not divide are
    an error naming the numbers, raised before any collective.
    """
    if group is None:
        if topology is not None:
            if sp_size is not None and sp_size != topology.size("sequence"):
                raise ConfigError(f"sp_size={sp_size} but the topology has sequence={topology.size('sequence')}; "
                                  f"use one size")
            group = sequence_group(topology)
        elif sp_size is not None and sp_size > 1:
            group = sequence_group(model_topology(model, sequence=sp_size))
        elif getattr(model, "ds_topology", None) is not None:
            group = sequence_group(model.ds_topology)
        else:
            group = TensorGroup()
    tg = group if isinstance(group, TensorGroup) else TensorGroup.of(group)
    if getattr(model, "ds_sp_group", None) is not None:
        if model.ds_sp_group.size != tg.size:
            raise ConfigError(f"the model is already sequence-parallel over {model.ds_sp_group.size} ranks")
        return model
    for name, heads in _heads(model):
        if heads % tg.size:
            raise ConfigError(f"attention module {name!r} has {heads} query heads (on this tensor rank), which "
                              f"sequence_parallel_size {tg.size} does not divide; choose a size dividing {heads}")
    is_hf = hasattr(model, "config") and hasattr(model.config, "_attn_implementation")
    if is_hf and tg.size > 1:
        current = model.config._attn_implementation
        register_ulysses_attention(tg, inner if current in (None, "eager", ATTENTION_NAME) else current, comm_dtype)
        try:
            model.set_attn_implementation(ATTENTION_NAME)
        except (ValueError, AttributeError):
            model.config._attn_implementation = ATTENTION_NAME
        if hasattr(model, "loss_function"):
            _wrap_loss(model, tg)
    for p in model.parameters():
        sum_gradient_over(p, tg, "sequence")
    model.ds_sp_group = tg
    return model
