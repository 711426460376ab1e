"""Process-group setup and the collectives ds features use, over ``torch.distributed``.

Each collective is a thin call into torch.distributed, recorded by the comms logger when its config
section enables it. We add no transport of our own.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..accelerator import get_accelerator
from ..errors import CommError
from . import watchdog
from .env import DistEnv, detect
from .logger import comms_logger

__all__ = [
    "init_distributed",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "global_rank",
    "get_backend",
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "all_to_all",
    "broadcast",
    "send",
    "recv",
    "isend",
    "reduce",
    "barrier",
    "new_group",
    "all_gather_strings",
    "ReduceOp",
]

ReduceOp = dist.ReduceOp

# torch 2.13 renamed the single-tensor forms; older releases only have the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    dist_backend: str | None = None,
    timeout: datetime.timedelta | float = datetime.timedelta(minutes=30),
    init_method: str | None = None,
    verbose: bool = False,
) -> DistEnv:
    """Create the default process group from the launcher's environment (no-op when it exists).

    Reads torchrun, Open MPI (``OMPI_*``), PMI (``PMI_*``) and SLURM variables; with none of them a
    single-process world is created so scripts also run without a launcher. The backend comes from
    the accelerator unless ``dist_backend`` names one.
    """
    env = detect()
    if is_initialized():
        watchdog.start()
        return env
    # A one-process world needs no rendezvous: an in-memory store avoids claiming a port.
    local_store = env.source == "single" and init_method is None and "MASTER_PORT" not in os.environ
    if env.source != "torchrun" and not local_store:
        env.export()
    acc = get_accelerator()
    backend = dist_backend or acc.communication_backend()
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=timeout)
    if acc.device_type != "cpu":
        acc.set_device(env.local_rank)
    if verbose and env.rank == 0:
        print(f"[ds] init_distributed: backend={backend} world={env.world_size} from {env.source}")
    try:
        if local_store:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=init_method or "env://",
                                    rank=env.rank, world_size=env.world_size, timeout=timeout)
    except ValueError as exc:
        raise CommError(f"backend {backend!r} (from accelerator {acc.name!r}) is not usable: {exc}; "
                        f"pass dist_backend= or pick another accelerator with DS_ACCELERATOR") from exc
    watchdog.start()  # names a rank that stops (DS_WATCHDOG_TIMEOUT)
    return env


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def get_backend(group=None) -> str:
    """The backend name of ``group`` (``"gloo"``, ``"nccl"``...); ``"none"`` without a process group."""
    return dist.get_backend(group) if is_initialized() else "none"


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (``rank`` itself for the default group)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _sync():
    acc = get_accelerator()
    return acc.synchronize if acc.device_type != "cpu" else None


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None, async_op: bool = False):
    with comms_logger.record("all_reduce", _bytes(tensor), get_world_size(group), _sync()):
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, op=ReduceOp.SUM, group=None,
                   async_op: bool = False):
    """``input`` holds world_size equal chunks; this rank receives the reduction of its chunk."""
    world = get_world_size(group)
    if input.numel() != output.numel() * world:
        raise CommError(f"reduce_scatter: input has {input.numel()} elements, expected "
                        f"{output.numel()} × {world} ranks = {output.numel() * world}")
    with comms_logger.record("reduce_scatter", _bytes(input), world, _sync()):
        return _reduce_scatter_single(output, input, op=op, group=group, async_op=async_op)


def all_gather(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """Concatenate every rank's ``input`` into ``output`` (rank order)."""
    world = get_world_size(group)
    if output.numel() != input.numel() * world:
        raise CommError(f"all_gather: output has {output.numel()} elements, expected "
                        f"{input.numel()} × {world} ranks = {input.numel() * world}")
    with comms_logger.record("all_gather", _bytes(output), world, _sync()):
        return _all_gather_single(output, input, group=group, async_op=async_op)


def all_to_all(output: torch.Tensor, input: torch.Tensor, output_split_sizes=None,
               input_split_sizes=None, group=None, async_op: bool = False):
    with comms_logger.record("all_to_all", _bytes(input), get_world_size(group), _sync()):
        return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes,
                                      group=group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int, group=None, async_op: bool = False):
    with comms_logger.record("broadcast", _bytes(tensor), get_world_size(group), _sync()):
        return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def send(tensor: torch.Tensor, dst: int, group=None):
    with comms_logger.record("send", _bytes(tensor), 2, _sync()):
        return dist.send(tensor, dst=dst, group=group)


def recv(tensor: torch.Tensor, src: int | None = None, group=None):
    with comms_logger.record("recv", _bytes(tensor), 2, _sync()):
        return dist.recv(tensor, src=src, group=group)


def isend(tensor: torch.Tensor, dst: int, group=None):
    """Non-blocking send; returns the work handle (keep ``tensor`` alive until it is waited)."""
    with comms_logger.record("send", _bytes(tensor), 2, None):
        return dist.isend(tensor, dst=dst, group=group)


def reduce(tensor: torch.Tensor, dst: int, op=ReduceOp.SUM, group=None, async_op: bool = False):
    """Reduce ``tensor`` of every rank into global rank ``dst``'s copy."""
    with comms_logger.record("reduce", _bytes(tensor), get_world_size(group), _sync()):
        return dist.reduce(tensor, dst=dst, op=op, group=group, async_op=async_op)


def new_group(ranks: list[int]):
    """A process group over global ``ranks``; every rank must call it, in the same order."""
    return dist.new_group(ranks)


def barrier(group=None):
    with comms_logger.record("barrier", 0, get_world_size(group), None):
        return dist.barrier(group=group)


def all_gather_strings(text: str, group=None) -> list[str]:
    """Every rank's ``text``, in rank order: tensors only (torch's *_object collectives need numpy)."""
    world = get_world_size(group)
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    sizes = torch.zeros(world, dtype=torch.int64)
    all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    width = max(1, int(sizes.max()))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[:data.numel()] = data
    out = torch.empty(world * width, dtype=torch.uint8)
    all_gather(out, padded, group=group)
    rows = out.view(world, width)
    return [bytes(rows[r, :int(sizes[r])].tolist()).decode() for r in range(world)]
