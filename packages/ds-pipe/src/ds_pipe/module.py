"""``PipelineModule``: a sequence of layers cut into stages, of which each rank builds only its own.

The layer list is the whole model in order; each layer's output is the next one's input (a tensor or
a tuple of tensors). The module picks the stage boundaries (``partition.py``), prints them on rank 0,
and builds the layers of this rank's stage — ``LayerSpec``s are only constructed there, so a stage
never allocates another stage's weights. The same class serves one process (``num_stages=1``, all
layers, an ordinary module) and the pipeline engine (``ds_pipe.engine``), which calls ``forward`` on
each micro-batch of the local stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ds_core import comm
from ds_core.activation_checkpointing import checkpoint as default_checkpoint
from ds_core.errors import ConfigError

from .partition import balanced_boundaries, layer_weights
from .spec import LayerSpec, TiedLayerSpec

__all__ = ["PipelineModule"]


def _name(layer) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", type(layer).__name__)


def _param_count(layer) -> int:
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):  # counts without allocating
            return sum(p.numel() for p in layer.build().parameters())
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters())
    return 0


def _resolve_topology(num_stages: int | None, topology):
    """The module's topology: ``topology``, or ``pipe=num_stages`` over every rank launched (data
    parallelism over the rest). Checked before any process group exists; no process-wide state."""
    world = comm.get_world_size() if comm.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if topology is not None:
        if num_stages is not None and num_stages != topology.size("pipe"):
            raise ConfigError(f"num_stages={num_stages} but topology has pipe={topology.size('pipe')}; "
                              f"pass one of them")
    else:
        if num_stages is None:
            raise ConfigError("PipelineModule needs num_stages= or topology= (a ds_core.comm.Topology "
                              "with a pipe axis)")
        if world % num_stages:
            raise ConfigError(f"num_stages={num_stages} does not divide the {world} ranks launched; "
                              f"launch a multiple of {num_stages} ranks or change num_stages")
        topology = comm.Topology(world, pipe=num_stages)
    if topology.world_size != world:
        raise ConfigError(f"topology covers {topology.world_size} ranks but {world} are running; build it "
                          f"with Topology({world}, pipe=...)")
    return topology


class PipelineModule(nn.Module):
    """DeepSpeed's ``PipelineModule`` surface; see the module docstring.

    ``loss_fn(outputs, labels)`` computes the loss on the last stage (without it the last layer's
    output is the loss). ``partition_method`` is ``parameters``, ``uniform`` or ``type:<regex>``.
    ``seed_layers`` seeds each layer's construction with ``base_seed + index``, so a layer's initial
    weights do not depend on which stage builds it. ``activation_checkpoint_interval`` > 0 runs each
    group of that many layers under ``activation_checkpoint_func`` in training.
    """

    def __init__(self, layers, num_stages: int | None = None, topology=None, loss_fn: Callable | None = None,
                 seed_layers: bool = False, seed_fn=None, base_seed: int = 1234,
                 partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable = default_checkpoint, checkpointable_layers=None) -> None:
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ConfigError("PipelineModule got an empty layer list; pass the model's layers in order")
        if activation_checkpoint_interval < 0:
            raise ConfigError(f"activation_checkpoint_interval {activation_checkpoint_interval} must be >= 0")
        self.topology = _resolve_topology(num_stages, topology)
        self.ds_topology = self.topology  # what ds_core.initialize checks the run's topology against
        self.num_stages = self.topology.size("pipe")
        self.global_rank = comm.get_rank() if comm.is_initialized() else 0
        self.stage_id = self.topology.coordinates(self.global_rank)["pipe"]
        self.loss_fn = loss_fn
        self.seed_layers, self.base_seed, self.seed_fn = seed_layers, base_seed, seed_fn
        self.partition_method = partition_method
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = checkpointable_layers
        self.layer_names = [_name(layer) for layer in layers]
        self._num_layers = len(layers)

        counts = ([_param_count(layer) for layer in layers] if partition_method.lower() == "parameters"
                  else [0] * len(layers))
        weights = layer_weights(partition_method, self.layer_names, counts)
        self.parts = balanced_boundaries(weights, self.num_stages)
        # Tied keys: global layer indices using each key, and the first one (its checkpoint file).
        self.tied_indices: dict[str, list[int]] = {}
        self.tied_attrs: dict[str, list[str]] = {}
        for idx, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                self.tied_indices.setdefault(layer.key, []).append(idx)
                self.tied_attrs.setdefault(layer.key, layer.tied_weight_attr)
        if self.global_rank == 0:
            print("[ds_pipe] " + self.describe_partition(counts), flush=True)
        self._build(layers)

    # -- construction ----------------------------------------------------------------------------
    def stage_of(self, layer_idx: int) -> int:
        return next(s for s in range(self.num_stages) if self.parts[s] <= layer_idx < self.parts[s + 1])

    def describe_partition(self, counts=None) -> str:
        lines = [f"partition_method={self.partition_method!r}, {self._num_layers} layers over "
                 f"{self.num_stages} stages:"]
        for s in range(self.num_stages):
            lo, hi = self.parts[s], self.parts[s + 1]
            params = f", {sum(counts[lo:hi]):,} parameters" if counts and any(counts) else ""
            lines.append(f"  stage {s}: layers {lo}-{hi - 1} ({', '.join(self.layer_names[lo:hi])}){params}")
        return "\n".join(lines)

    def _build(self, layers) -> None:
        self.tied_modules = nn.ModuleDict()
        self.forward_funcs: list[Callable] = []
        self.local_layers: dict[int, nn.Module] = {}  # global index -> module (not tied ones)
        lo, hi = self.parts[self.stage_id], self.parts[self.stage_id + 1]
        self.local_start, self.local_stop = lo, hi
        for idx in range(lo, hi):
            layer = layers[idx]
            with torch.random.fork_rng(devices=[]):
                if self.seed_layers:
                    torch.manual_seed(self.base_seed + idx)
                if isinstance(layer, TiedLayerSpec):
                    if layer.key not in self.tied_modules:
                        self.tied_modules[layer.key] = layer.build()
                    module = self.tied_modules[layer.key]
                    self.forward_funcs.append(partial(layer.forward_fn, module) if layer.forward_fn else module)
                    continue
                module = layer.build() if isinstance(layer, LayerSpec) else layer
            if isinstance(module, nn.Module):
                self.add_module(str(idx), module)
                self.local_layers[idx] = module
            elif not callable(module):
                raise ConfigError(f"layer {idx} ({module!r}) is not a LayerSpec, nn.Module or callable")
            self.forward_funcs.append(module)

    def tied_parameters(self, key: str) -> list[nn.Parameter]:
        """The parameters of tied module ``key`` named by its ``tied_weight_attr`` paths."""
        out = []
        for path in self.tied_attrs[key]:
            obj = self.tied_modules[key]
            for part in path.split("."):
                obj = getattr(obj, part)
            out.append(obj)
        return out

    def tie_owners(self, key: str) -> list[int]:
        """Stages holding tied module ``key``, ascending."""
        return sorted({self.stage_of(i) for i in self.tied_indices[key]})

    # -- forward ---------------------------------------------------------------------------------
    def _run(self, start: int, stop: int):
        def run(*x):
            x = x[0] if len(x) == 1 else x
            for fn in self.forward_funcs[start:stop]:
                x = fn(x)
            return x
        return run

    def forward(self, *inputs):
        x = inputs
        n = len(self.forward_funcs)
        interval = self.activation_checkpoint_interval
        if interval <= 0 or not (self.training and torch.is_grad_enabled()):
            return self._run(0, n)(*x)
        for start in range(0, n, interval):
            stop = min(start + interval, n)
            args = x if isinstance(x, tuple) else (x,)
            x = self.activation_checkpoint_func(self._run(start, stop), *args)
        return x
