"""Communication: process-group setup from any launcher, collectives, topology, comms logger."""

from .collectives import (
    ReduceOp,
    all_gather,
    all_gather_strings,
    all_reduce,
    all_to_all,
    barrier,
    broadcast,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    recv,
    reduce_scatter,
    send,
)
from .env import DistEnv, detect, expand_nodelist
from .logger import CommsLogger, comms_logger
from .topology import AXES, Topology, ensure_topology, get_topology, set_topology

__all__ = [
    "init_distributed",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "all_to_all",
    "broadcast",
    "send",
    "recv",
    "barrier",
    "all_gather_strings",
    "ReduceOp",
    "DistEnv",
    "detect",
    "expand_nodelist",
    "Topology",
    "get_topology",
    "set_topology",
    "ensure_topology",
    "AXES",
    "CommsLogger",
    "comms_logger",
]
