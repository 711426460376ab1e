"""ds-parallel inside ``ds_core.initialize``: the ``tensor_parallel`` section's ``model_wrapper``.

This is the one module that talks to ds-core's training seam (with :mod:`ds_parallel._seam` for the
parameter tags). The topology is settled before any component runs: ``initialize`` asks the parsed
``tensor_parallel`` section for its axes (:meth:`~ds_parallel.config.TensorParallelConfig.ds_axes`,
``{"tensor": autotp_size}``) and reads the top-level ``sequence_parallel_size``, so the run's topology
already has those axes (with the data axis what is left of the world, and the batch triple resolved
for it). ``model_wrapper(ctx, module)`` (``order = 10``: before other transforms, e.g. compression,
and before the data-parallel strategy takes the parameters) then shards the module over
``ctx.topology``'s tensor axis, splits sequences over its sequence axis, and tags every sharded
parameter (``shard_axis="tensor"``) so that gradients average over ``data`` only, the step decision
sums sharded norms over ``tensor`` and checkpoints are written per tensor rank (``tp{t}_`` files).
"""

from __future__ import annotations

from torch import nn

from ds_core.errors import ConfigError

from .comm import tensor_group

__all__ = ["model_wrapper"]


def _check_strategy(strategy: str, tensor: int, sequence: int) -> None:
    if strategy == "zero-3" and (tensor > 1 or sequence > 1):
        what = "tensor" if tensor > 1 else "sequence"
        raise ConfigError(f"ZeRO stage 3 with {what} parallelism is not supported: stage 3 partitions only "
                          f"parameters replicated over the data axis; use zero_optimization.stage 1 or 2 "
                          f"(optimizer state and gradients partitioned over the data axis)")


def model_wrapper(ctx, module: nn.Module) -> nn.Module:
    """The ``model_wrapper`` component: shard ``module`` over ``ctx.topology``'s tensor and sequence axes."""
    from .apply import tensor_parallel
    from .layers import use_shard_names

    section = ctx.section
    if section is not None:
        section.warn_unused()
    topology = ctx.topology
    tensor, sequence = topology.size("tensor"), topology.size("sequence")
    done = getattr(module, "ds_tp_group", None)
    if done is not None and done.size != tensor:
        raise ConfigError(f"the model is already sharded over {done.size} tensor ranks but the run's topology has "
                          f"tensor={tensor} ({topology!r}); build the model unsharded or use one size")
    sp_done = getattr(module, "ds_sp_group", None)
    if sp_done is not None and sp_done.size != sequence:
        raise ConfigError(f"the model is already sequence-parallel over {sp_done.size} ranks but the run's topology "
                          f"has sequence={sequence} ({topology!r}); use one size")
    _check_strategy(ctx.strategy, tensor, sequence)
    if tensor > 1 and done is None:
        names = [n for n, _ in module.named_modules() if n]
        overrides, keep = section.overrides_for(names) if section is not None else ({}, True)
        kwargs = {"vocab_parallel_head": section.vocab_parallel_head, "shard_embeddings": section.shard_embeddings} \
            if section is not None else {}
        module = tensor_parallel(module, group=tensor_group(topology), overrides=overrides, keep_found=keep, **kwargs)
    elif tensor > 1:
        use_shard_names(module)  # engine checkpoints tell shards apart by name
    if sequence > 1 and sp_done is None:
        from .sequence.hf import sequence_group, sequence_parallel

        module = sequence_parallel(module, group=sequence_group(topology), comm_dtype=ctx.sequence_comm_dtype)
    return module


model_wrapper.order = 10  # before other model transforms (compression wraps the sharded layers)
