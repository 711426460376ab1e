"""Tensor-parallel serving: one scheduler on rank 0, the same forward on every rank.

Rank 0 owns the engine (scheduler, block manager, sampler, tokenizer, HTTP front). Every step it
broadcasts the :class:`~ds_infer.serving.runner.StepPlan` — plain lists, a few kilobytes — over a
gloo group, and all ranks run it: each holds ``1/tp`` of the weights (the model's own tensor-parallel
layers) and of the KV heads, with the same block tables. The model all-gathers the logits, so rank 0
samples from the full vocabulary. Workers own no request state; a worker that lost rank 0 has
nothing to recover.

Two ways to get the ranks:

- **spawned**: ``LLM(..., tensor_parallel_size=N)`` or ``ds serve --tp N`` in one process: this
  process becomes rank 0 and starts ``N - 1`` worker processes that follow plans until shut down;
- **launched**: the script already runs on N ranks (``ds run --nproc N``, torchrun, the test
  harness) with the default process group up; every rank builds the engine the same way. Rank 0's
  ``LLM.generate`` drives, the other ranks follow until the batch ends and then return rank 0's
  outputs; ``ds serve`` on a worker rank follows until the server stops.

[Note: the KV cache size is agreed] Every rank sizes its cache from its own free memory, then
they take the minimum (an all-reduce), so the block tables rank 0 hands out fit on every rank.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ds_core import comm

from .config import ServingConfig
from .engine import LLMEngine, plan_kv_cache
from .kv_cache import PagedKVCache
from .runner import ModelRunner, StepPlan

__all__ = ["DistributedExecutor", "Follower", "build_distributed_engine", "follow"]

log = logging.getLogger("ds_infer.serving")


def _control_group():
    """A gloo group for the plans (NCCL cannot broadcast Python objects from host memory)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def _broadcast_plan(plan: StepPlan | None, group) -> StepPlan:
    box = [plan]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def follow(runner: ModelRunner, group) -> bool:
    """A worker's loop: run every plan rank 0 broadcasts. True when told to shut down, False at a pause."""
    while True:
        plan = _broadcast_plan(None, group)
        if plan.shutdown:
            return True
        if plan.pause:
            return False
        runner.execute(plan)


class DistributedExecutor:
    """Rank 0's side: broadcast each plan, then run it here too."""

    def __init__(self, runner: ModelRunner, group, processes: list | None = None, spawned: bool = False) -> None:
        self.runner, self.group, self.processes, self.spawned = runner, group, processes or [], spawned
        self.closed = False

    @property
    def cache(self) -> PagedKVCache:
        return self.runner.cache

    def execute(self, plan: StepPlan):
        _broadcast_plan(plan, self.group)
        return self.runner.execute(plan)

    def end_batch(self, outputs: Any) -> None:
        """Launched mode: release the followers of an offline batch and give them its outputs."""
        if self.spawned or self.closed:
            return
        _broadcast_plan(StepPlan(pause=True), self.group)
        dist.broadcast_object_list([outputs], src=0, group=self.group)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _broadcast_plan(StepPlan(shutdown=True), self.group)
        for proc in self.processes:
            proc.join(60)
            if proc.is_alive():  # pragma: no cover - a worker stuck in a collective
                proc.terminate()
        if self.spawned:
            dist.destroy_process_group()


class Follower:
    """A worker rank's handle in launched mode (what ``build_distributed_engine`` returns there)."""

    def __init__(self, runner: ModelRunner, group, tokenizer=None) -> None:
        self.runner, self.group, self.tokenizer = runner, group, tokenizer
        self.shut_down = False

    def follow_batch(self) -> Any:
        """Follow plans until rank 0 ends its batch; returns rank 0's outputs (None if it shut down)."""
        if self.shut_down:
            return None
        if follow(self.runner, self.group):
            self.shut_down = True
            return None
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def serve_forever(self) -> None:
        while not self.shut_down:
            self.follow_batch()


def _device_for_rank(device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())) % torch.cuda.device_count())
    return torch.device("cpu")


def _build_runner(model_dir, *, tp: int, dtype, quant, device, config: ServingConfig, group):
    from ..models import load_model

    device = _device_for_rank(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = load_model(model_dir, dtype=dtype, quant=quant, tp=tp, device=device)
    spec = model.kv_spec()
    num_blocks, _ = plan_kv_cache(spec, config, model.arch.max_position_embeddings)
    agreed = torch.tensor([num_blocks], dtype=torch.long)
    comm.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    config = config.model_copy(update={"num_kv_blocks": int(agreed)})
    cache = PagedKVCache(spec.num_layers, int(agreed), config.block_size, spec.num_kv_heads, spec.head_dim,
                         spec.dtype, spec.device)  # fmt: skip
    use_op = config.attention_backend == "ds_ops" or (config.attention_backend == "auto" and device.type == "cuda")
    if use_op:
        from ds_core.ops import has_op

        use_op = has_op("paged_attention")
    return model, ModelRunner(model, cache, use_op=use_op), config


def _worker_main(rank: int, world: int, init_method: str, model_dir: str, dtype, quant, device,
                 config: dict) -> None:  # fmt: skip
    backend = "nccl" if torch.cuda.is_available() and device in (None, "cuda") else "gloo"
    os.environ.setdefault("LOCAL_RANK", str(rank))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        group = _control_group()
        _, runner, _ = _build_runner(model_dir, tp=world, dtype=dtype, quant=quant, device=device,
                                     config=ServingConfig(**config), group=group)  # fmt: skip
        follow(runner, group)
    finally:
        dist.destroy_process_group()


def build_distributed_engine(model_dir: str | Path, tokenizer, *, tensor_parallel_size: int, dtype: Any = None,
                             quant: Any = None, device: Any = None, config: ServingConfig,
                             observer=None) -> LLMEngine | Follower:  # fmt: skip
    """Rank 0: an engine whose executor drives every rank. Other ranks (launched mode): a :class:`Follower`."""
    tp = tensor_parallel_size
    processes = []
    spawned = not dist.is_initialized()
    if spawned:
        import torch.multiprocessing as mp

        from .api_server import free_port

        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        dev = None if device is None else str(device)
        for rank in range(1, tp):
            proc = ctx.Process(target=_worker_main, name=f"ds-serve-tp{rank}", daemon=True,
                               args=(rank, tp, init_method, str(model_dir), dtype, quant, dev, config.model_dump()))
            proc.start()
            processes.append(proc)
        backend = "nccl" if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")) else "gloo"
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=tp)
    elif dist.get_world_size() != tp:
        from ds_core.errors import ConfigError

        raise ConfigError(f"tensor_parallel_size={tp} but the process group has {dist.get_world_size()} ranks; "
                          f"launch {tp} ranks (ds run --nproc {tp}) or pass tensor_parallel_size="
                          f"{dist.get_world_size()}")
    group = _control_group()
    model, runner, config = _build_runner(model_dir, tp=tp, dtype=dtype, quant=quant, device=device, config=config,
                                          group=group)  # fmt: skip
    if dist.get_rank() != 0:
        return Follower(runner, group, tokenizer)
    executor = DistributedExecutor(runner, group, processes, spawned=spawned)
    return LLMEngine(model, tokenizer, config, model_dir=model_dir, executor=executor, observer=observer)
