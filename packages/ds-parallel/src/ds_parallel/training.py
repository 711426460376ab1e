"""ds-parallel inside ``ds_core.initialize``: the ``tensor_parallel`` section's ``model_wrapper``.

This is the one module that talks to ds-core's training seam (with :mod:`ds_parallel._seam` for the
parameter tags). ``model_wrapper(engine, module)`` runs while the engine is being built, before it
creates gradient buffers, reducers or the optimizer from its topology: it makes sure the topology
has the tensor (and sequence) axis the config asks for, then shards the model.

[Note: topology adoption] ``initialize`` builds its default topology (everything on the data axis)
before components run. When that topology lacks the tensor or sequence axis the config asks for,
the wrapper re-shapes that topology object in place (the engine's constructor still holds it in a
local variable it builds more groups from) and refreshes what the engine already took from it: the
data-parallel group and its size and the resolved batch sizes. That is safe because nothing else
has been built from the old shape yet. A run that builds the model with :func:`ds_parallel.tensor_parallel` (or sets the
topology with ``ds_core.comm.ensure_topology(tensor=N)``) before ``initialize`` needs none of this,
and is the way to give a ``train_batch_size`` computed for the data-parallel size
(``initialize`` checks the batch triple against the launched world before any component runs).
"""

from __future__ import annotations

import torch
from torch import nn

from ds_core import comm
from ds_core.errors import ConfigError

from .comm import tensor_group

__all__ = ["model_wrapper", "requested_sizes", "adopt_topology"]


def requested_sizes(config) -> tuple[int, int]:
    """``(tensor, sequence)`` sizes a ds-core config asks for.

    ``sequence_parallel_size`` is a top-level DeepSpeed key; with a ds-core config model that does not
    define it yet, the sequence size comes from the topology (``ds_parallel.sequence_parallel`` or
    ``ds_core.comm.ensure_topology(sequence=N)`` before ``initialize``).
    """
    section = config.section("tensor_parallel")
    tensor = section.size if section is not None else 1
    sequence = getattr(config, "sequence_parallel_size", None) or 1
    return tensor, int(sequence)


def adopt_topology(engine, tensor: int, sequence: int) -> None:
    """Give ``engine`` a topology with these axes (see [Note: topology adoption])."""
    old = engine.topology
    world = comm.get_world_size()
    if old is not None:
        for axis, want in (("tensor", tensor), ("sequence", sequence)):
            have = old.size(axis)
            if have not in (1, want):
                raise ConfigError(f"the config asks for {axis} size {want} but the topology already has {axis}="
                                  f"{have} ({old!r}); use one size")
        if old.size("tensor") == tensor and old.size("sequence") == sequence:
            return
        pipe, expert = old.size("pipe"), old.size("expert")
    else:
        pipe = expert = 1
    topology = comm.Topology(world, pipe=pipe, expert=expert, sequence=sequence, tensor=tensor,
                             device_type=getattr(old, "device_type", "cpu"))
    if old is not None:  # the same object everywhere it is already referenced (see the note)
        old.__dict__.clear()
        old.__dict__.update(topology.__dict__)
        topology = old
    comm.set_topology(topology)
    engine.topology = topology
    engine.dp_group = topology.group("data") if world > 1 else None
    engine.dp_world_size = comm.get_world_size(engine.dp_group)
    engine.config.resolve_batch(engine.dp_world_size)


def _check_zero(config, tensor: int, sequence: int) -> None:
    zero = config.section("zero_optimization")
    stage = getattr(zero, "stage", 0) or 0
    if stage >= 3 and (tensor > 1 or sequence > 1):
        what = "tensor" if tensor > 1 else "sequence"
        raise ConfigError(f"ZeRO stage 3 with {what} parallelism is not supported: stage 3 partitions only "
                          f"parameters replicated over the data axis; use zero_optimization.stage 1 or 2 "
                          f"(optimizer state and gradients partitioned over the data axis)")


def model_wrapper(engine, module: nn.Module) -> nn.Module:
    """The ``model_wrapper`` component: shard ``module`` as the config says (tensor and sequence)."""
    from .apply import tensor_parallel
    from .layers import use_shard_names

    section = engine.config.section("tensor_parallel")
    if section is not None:
        section.warn_unused()
    tensor, sequence = requested_sizes(engine.config)
    done = getattr(module, "ds_tp_group", None)
    if done is not None and done.size != tensor and tensor > 1:
        raise ConfigError(f"the model is already sharded over {done.size} tensor ranks but tensor_parallel."
                          f"autotp_size is {tensor}; build the model unsharded or use one size")
    if done is not None and tensor == 1:
        tensor = done.size
    sp_done = getattr(module, "ds_sp_group", None)
    if sequence == 1 and sp_done is not None:
        sequence = sp_done.size
    if sequence == 1 and engine.topology is not None:
        sequence = engine.topology.size("sequence")
    _check_zero(engine.config, tensor, sequence)
    if tensor > 1 or sequence > 1:
        adopt_topology(engine, tensor, sequence)
    if tensor > 1 and done is None:
        names = [n for n, _ in module.named_modules() if n]
        overrides, keep = section.overrides_for(names) if section is not None else ({}, True)
        kwargs = {"vocab_parallel_head": section.vocab_parallel_head, "shard_embeddings": section.shard_embeddings} \
            if section is not None else {}
        module = tensor_parallel(module, group=tensor_group(engine.topology), overrides=overrides,
                                 keep_found=keep, **kwargs)
    elif tensor > 1:
        use_shard_names(module)  # engine checkpoints tell shards apart by name
    if sequence > 1 and sp_done is None:
        from .sequence.hf import sequence_group, sequence_parallel

        comm_dtype = getattr(engine.config, "seq_parallel_communication_data_type", None)
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}
        module = sequence_parallel(module, group=sequence_group(engine.topology), comm_dtype=dtypes.get(comm_dtype))
    return module
