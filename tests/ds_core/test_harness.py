"""The test harness itself: failures from any rank are reported; a hung collective times out."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from ds_core.testing import DistributedTestError, run_distributed


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _rank1_fails():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait forever for rank 1


def _rank0_hangs():
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(60)


def _early_exit_probe():
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 1:  # needs no collective: done at once
        store.set("rank1_pid", str(os.getpid()))
        return None
    pid = int(store.get("rank1_pid"))
    time.sleep(2)
    try:  # rank 1 must still be there, its process group intact, while rank 0 is in its body
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_rank_that_finishes_first_waits_for_the_others():
    assert run_distributed(_early_exit_probe, 2, timeout=60) == [True, None]


def test_results_from_every_rank():
    assert run_distributed(_rank_and_sum, 2) == [(0, 1.0), (1, 1.0)]


def test_failure_reports_rank_and_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_rank1_fails, 2, timeout=60)
    text = str(info.value)
    assert "--- rank 1 ---" in text and "boom on rank one" in text and "Traceback" in text


def test_hang_times_out():
    with pytest.raises(DistributedTestError, match="did not finish within 8 s"):
        run_distributed(_rank0_hangs, 2, timeout=8)


def test_fixture_runner(distributed):
    assert distributed.run(_rank_and_sum, 2, mode="thread", timeout=30) == [(0, 1.0), (1, 1.0)]
