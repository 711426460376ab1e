"""Reading rank and world size from the environment a launcher left: torchrun, MPI or SLURM.

Nothing here touches torch.distributed; :func:`detect` only reads variables and checks them, so a
bad environment fails before any process group exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import CommError

__all__ = ["DistEnv", "detect", "expand_nodelist"]

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "mpi", "pmi", "slurm" or "single"

    def export(self) -> None:
        """Write the torch.distributed variables so env:// initialisation sees them."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise CommError(f"environment variable {key}={env[key]!r} must be an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM nodelist such as ``node[01-03,07],gpu5`` into host names."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, check=True, timeout=10).stdout
            return out.split()
        except (subprocess.SubprocessError, OSError):
            pass
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        match = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{width}d}")
    return hosts


def detect(env: dict[str, str] | None = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from the launcher's variables."""
    env = dict(os.environ if env is None else env)
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        source = "torchrun"
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else rank
        source = "mpi"
    elif "PMI_RANK" in env:
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_key = next((k for k in ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID") if k in env), None)
        local = _int(env, local_key) if local_key else rank
        source = "pmi"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" not in env:
            nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
            addr = env.get("SLURM_LAUNCH_NODE_IPADDR") or (nodes[0] if nodes else addr)
        source = "slurm"
    else:
        rank, world, local, source = 0, 1, 0, "single"
    if world < 1 or not 0 <= rank < world:
        raise CommError(
            f"rank {rank} with world size {world} (from {source} variables) is impossible: the rank "
            f"must be in [0, world size); check the launcher's environment"
        )
    if local < 0:
        raise CommError(f"local rank {local} (from {source} variables) must be >= 0")
    return DistEnv(rank, world, local, addr, port, source)
