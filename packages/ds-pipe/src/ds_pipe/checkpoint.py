"""Pipeline checkpoints: one safetensors file per layer, so any number of stages can load them.

A pipeline saves through its stage engine (``ds_core.engine.checkpoint_layout``): this module is only
the *module layout* of that checkpoint. Layout of ``save_dir/tag/``:

- ``layer_XX-model_states.safetensors``: layer ``XX``'s state dict (global layer index), written by data
  rank 0 of its stage (with tensor or sequence parallelism, one per model shard, prefixed with its
  coordinates: ``tp1_layer_XX-model_states.safetensors``). A tied module is stored by every stage holding it, under the first index it
  uses there: its tied weights are equal everywhere, its other weights are each stage's own (the head
  stage's copy of an embedding's position table is never used there, but it is its state). A stage
  loads its copy from its own index, or from the first index that uses the module when the stages
  were cut differently;
- the data-parallel strategy's state of each stage, prefixed with the stage (``pp{s}_``): stage 0's
  ``pp{s}_optimizer.safetensors`` / ``pp{s}_master.safetensors``, or ZeRO-1's
  ``pp{s}_zero_rank{d}.safetensors``, described in ``pp{s}_meta.json`` (which names the strategy's
  layout: loading optimizer state under another ZeRO stage is refused naming both);
- ``meta.json``: layer names, stage boundaries, counters, scheduler, config, JSON ``client_state``
  (its tensors in ``client.safetensors``); ``rng_rank{r}.safetensors`` / ``.json`` per rank.

Because the strategy loads its own state — or, without it, makes its master weights follow the loaded
layers — a reload into a freshly built model continues exactly where the saved run stopped. Layers
reload under any stage partition; optimizer state only under the same boundaries and data size.
Everything goes through ds-core's atomic directory protocol.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from ds_core.engine.checkpoint import CheckpointError

__all__ = ["LayerFiles", "layer_file", "pipeline_meta", "check"]


def layer_file(idx: int, shard: str = "") -> str:
    """Layer ``idx``'s file; ``shard`` prefixes it with the model shard of other axes (``tp1_``)."""
    return f"{shard}layer_{idx:02d}-model_states.safetensors"


def _shard(scope: str) -> str:
    """The scope without its pipeline stage (``pp0_tp1_`` -> ``tp1_``): layer files are named by global
    layer index, so only tensor/sequence coordinates tell two ranks' files of one layer apart."""
    return re.sub(r"^pp\d+_", "", scope)


def _local_layers(module) -> dict[int, torch.nn.Module]:
    """Global layer index -> module, for the layers this stage holds; a tied module under its first
    index on this stage."""
    targets = dict(module.local_layers)
    for key, tied in module.tied_modules.items():
        targets[_first_local(module, key)] = tied
    return targets


def _first_local(module, key: str) -> int:
    return min(i for i in module.tied_indices[key] if module.stage_of(i) == module.stage_id)


def pipeline_meta(module) -> dict:
    """What ``meta.json`` records about the pipeline (layers and stage boundaries)."""
    return {"kind": "pipeline", "layer_names": module.layer_names, "parts": module.parts,
            "num_stages": module.num_stages}


class LayerFiles:
    """The module layout of a pipeline stage: its layers' files (the engine's ``module_files``)."""

    def __init__(self, module) -> None:
        self.module = module

    def save(self, writer) -> dict:
        shard = _shard(writer.scope)
        for idx, layer in _local_layers(self.module).items():
            writer.replicated(layer_file(idx, shard)[:-len(".safetensors")], layer.state_dict(), scoped=False)
        return {}

    def _targets(self, path, shard: str = "") -> dict[int, torch.nn.Module]:
        """Layer file index -> module to load it into (a tied module: its own copy if it was saved, else
        the first one)."""
        module = self.module
        targets = dict(module.local_layers)
        for key, tied in module.tied_modules.items():
            own = _first_local(module, key)
            targets[own if (path / layer_file(own, shard)).is_file() else module.tied_indices[key][0]] = tied
        for idx in targets:
            f = path / layer_file(idx, shard)
            if not f.is_file():
                raise CheckpointError(f"{f} is missing: layer {idx} ({module.layer_names[idx]}) was not saved; "
                                      f"load a checkpoint written by this model")
        return targets

    def check(self, reader) -> None:
        self._targets(reader.path, _shard(reader.scope))

    def saved(self, reader) -> dict[str, torch.Tensor]:
        return {}

    def load(self, reader) -> None:
        shard = _shard(reader.scope)
        for idx, layer in sorted(self._targets(reader.path, shard).items()):
            f = reader.path / layer_file(idx, shard)
            try:
                with torch.no_grad():
                    layer.load_state_dict(load_file(str(f)))
            except RuntimeError as exc:
                raise CheckpointError(f"{f} does not fit layer {idx} ({self.module.layer_names[idx]}): {exc}") from None


def check(engine, reader, load_optimizer_states: bool) -> None:
    """The pipeline's checks of a checkpoint, before anything changes."""
    meta, module = reader.engine_meta, engine.module
    if meta.get("kind") != "pipeline":
        raise CheckpointError(f"{reader.path} was not written by a pipeline engine; load it with the engine "
                              f"that saved it")
    if meta["layer_names"] != module.layer_names:
        raise CheckpointError(f"{reader.path} holds layers {meta['layer_names']} but this PipelineModule has "
                              f"{module.layer_names}; load a checkpoint of the same layer list")
    # the tensor-parallel size the layer files were written at (one file set per tensor rank)
    layer_tp = re.compile(r"^(?:sp\d+_)?tp(\d+)_layer_\d+-model_states\.safetensors$")
    saved_tp = len({m[1] for f in reader.path.iterdir() if (m := layer_tp.match(f.name))}) or 1
    if saved_tp != engine.topology.size("tensor"):
        raise CheckpointError(
            f"{reader.path} was saved with tensor_parallel.autotp_size {saved_tp}; this run has "
            f"{engine.topology.size('tensor')}: the engine reloads a pipeline checkpoint only at its tensor-parallel "
            f"size. Load the weights with ds_parallel.load_tp_checkpoint(engine.module, save_dir), or consolidate "
            f"them with `ds zero-to-fp32 save_dir out.safetensors`")
    same = meta["parts"] == module.parts and meta["dp_world_size"] == engine.dp_world_size
    if load_optimizer_states and not same:
        raise CheckpointError(
            f"{reader.path} was saved with stage boundaries {meta['parts']} × {meta['dp_world_size']} data ranks; "
            f"this run has {module.parts} × {engine.dp_world_size}: layers reload under any partition, optimizer "
            f"state does not — pass load_optimizer_states=False (or load_module_only=True)")
