"""Collectives, environment detection, topology and the comms logger on real gloo processes."""

import pytest
import torch
import torch.distributed as dist

from ds_core import comm
from ds_core.comm import Topology, detect, expand_nodelist
from ds_core.errors import CommError


@pytest.mark.world_size(2)
def test_collectives_two_ranks():
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.full((4,), float(rank + 1))
    comm.all_reduce(t)
    assert t.tolist() == [3.0] * 4

    out = torch.empty(2)
    comm.reduce_scatter(out, torch.arange(4.0) + rank)
    assert out.tolist() == ([1.0, 3.0] if rank == 0 else [5.0, 7.0])

    gathered = torch.empty(2 * world)
    comm.all_gather(gathered, torch.tensor([rank, rank * 10.0]))
    assert gathered.tolist() == [0.0, 0.0, 1.0, 10.0]

    a2a = torch.empty(2)
    comm.all_to_all(a2a, torch.tensor([rank * 2.0, rank * 2.0 + 1]))
    assert a2a.tolist() == ([0.0, 2.0] if rank == 0 else [1.0, 3.0])

    b = torch.tensor([float(rank)])
    comm.broadcast(b, src=1)
    assert b.item() == 1.0

    if rank == 0:
        comm.send(torch.tensor([42.0]), dst=1)
    else:
        r = torch.empty(1)
        comm.recv(r, src=0)
        assert r.item() == 42.0
    comm.barrier()


@pytest.mark.world_size(2)
def test_all_gather_strings():
    texts = comm.all_gather_strings("" if dist.get_rank() == 0 else "rank one: é")
    assert texts == ["", "rank one: é"]


@pytest.mark.world_size(2)
def test_comms_logger_records_bandwidth():
    from ds_core.comm import comms_logger
    from ds_core.config import CommsLoggerConfig

    comms_logger.configure(CommsLoggerConfig(enabled=True))
    comms_logger.reset()
    for _ in range(3):
        comm.all_reduce(torch.ones(1024))
    comm.all_gather(torch.empty(2048), torch.ones(1024))
    totals = comms_logger.totals()
    assert totals["all_reduce"]["count"] == 3
    assert totals["all_reduce"]["bytes"] == 3 * 4096
    table = comms_logger.summary()
    assert "all_reduce" in table and "busbw GB/s" in table and "4.0 KB" in table


@pytest.mark.world_size(2)
def test_collective_size_mismatch_is_clear():
    with pytest.raises(CommError, match="expected 2 × 2 ranks = 4"):
        comm.reduce_scatter(torch.empty(2), torch.ones(5))


@pytest.mark.world_size(4, timeout=240)
def test_topology_groups_four_ranks():
    topo = Topology(dist.get_world_size(), pipe=2, expert=2)
    rank = dist.get_rank()
    assert topo.size("data") == 2 and topo.size("expert") == 2 and topo.size("expert_data") == 1
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=topo.group("pipe"))
    assert t.item() == float(sum(topo.ranks_along("pipe", rank)))
    d = torch.tensor([float(rank)])
    dist.all_reduce(d, group=topo.group("data"))
    assert d.item() == float(sum(topo.ranks_along("data", rank)))
    assert topo.rank("pipe") == topo.coordinates(rank)["pipe"]


@pytest.mark.world_size(2, mode="thread", timeout=60)
def test_threaded_mode_runs_collectives():
    t = torch.ones(2) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    assert t.tolist() == [3.0, 3.0]


def test_topology_arithmetic_no_process_group():
    topo = Topology(8, pipe=2, tensor=2)
    assert topo.size("data") == 2
    assert topo.ranks_along("pipe", 0) == [0, 4]
    assert topo.ranks_along("tensor", 0) == [0, 1]
    assert topo.ranks_along("data", 0) == [0, 2]
    moe = Topology(4, expert=2)
    assert moe.ranks_along("expert", 1) == [0, 1] and moe.ranks_along("expert_data", 1) == [1, 3]


def test_topology_bad_sizes():
    with pytest.raises(CommError, match="not divisible by pipe 3"):
        Topology(4, pipe=3)
    with pytest.raises(CommError, match="!= world size 4"):
        Topology(4, pipe=2, data=3)
    with pytest.raises(CommError, match="expert axis 3 must divide the data axis 4"):
        Topology(4, expert=3)


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "123"},
     (1, 4, 1, "h", 123, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "MASTER_ADDR": "m"}, (3, 4, 1, "m", 29500, "mpi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}, (2, 3, 0, "127.0.0.1", 29500, "pmi")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]"},
     (5, 8, 1, "gpu03", 29500, "slurm")),
    ({}, (0, 1, 0, "127.0.0.1", 29500, "single")),
])
def test_env_detection(env, expected):
    e = detect(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == expected


def test_env_detection_rejects_bad_rank():
    with pytest.raises(CommError, match="rank 4 with world size 4"):
        detect({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(CommError, match="RANK='x' must be an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "4"})


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
