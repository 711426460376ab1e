"""Collective bandwidth on 2 gloo ranks, as the comms logger reports it.

    python benchmarks/bench_comm.py

Prints the logger's summary table for all_reduce, all_gather and reduce_scatter at 1 KiB to 16 MiB.
"""

from __future__ import annotations

import torch

from ds_core import comm
from ds_core.config import CommsLoggerConfig
from ds_core.testing import run_distributed


def _run() -> str:
    comm.comms_logger.configure(CommsLoggerConfig(enabled=True))
    world = comm.get_world_size()
    for numel in (256, 16384, 1 << 20, 1 << 22):
        x = torch.ones(numel)
        for _ in range(5):
            comm.all_reduce(x)
            comm.all_gather(torch.empty(numel * world), x)
            comm.reduce_scatter(torch.empty(numel // world), x)
    return comm.comms_logger.summary()


if __name__ == "__main__":
    print(run_distributed(_run, 2, timeout=600)[0])
