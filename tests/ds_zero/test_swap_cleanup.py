"""NVMe swap files never outlive their run: a killed run's files are reclaimed by the next run on the
same path (a live run's never are), and SIGTERM removes them at once."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from ds_zero.swap import SwapStore

# Makes a store with two files, says so, then waits to be killed or told to finish.
HOLDER = """
import sys, time, torch
from ds_zero.swap import SwapStore
store = SwapStore(sys.argv[1], rank=0, kind="optimizer", config_key="offload_optimizer")
store.create("g0", 1024, torch.float32)
store.write("g0", torch.ones(1024)).wait()
store.create("g1", 16, torch.float32)
print("ready", flush=True)
if sys.stdin.readline().strip() == "close":
    store.close()
    print("closed", flush=True)
while True:
    time.sleep(0.1)
"""


def _start(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _files(tmp_path):
    root = tmp_path / "ds_zero_swap" / "rank0"
    return sorted(os.listdir(root)) if root.is_dir() else []


def test_killed_runs_files_are_reclaimed_by_the_next_run(tmp_path):
    proc = _start(tmp_path)
    proc.kill()  # kill -9: no cleanup code runs
    proc.wait()
    left = _files(tmp_path)
    assert sum(f.endswith(".swp") for f in left) == 2
    store = SwapStore(tmp_path, rank=1, kind="param", config_key="offload_param")
    with pytest.warns(RuntimeWarning, match=r"removed 2 NVMe swap file\(s\) .* left by runs that ended without"):
        store.create("g0", 8, torch.float32)
    assert _files(tmp_path) == []
    store.close()
    assert not (tmp_path / "ds_zero_swap").exists()


def test_a_live_runs_files_are_kept(tmp_path):
    proc = _start(tmp_path)
    try:
        from ds_zero.swap import reclaim_stale

        before = _files(tmp_path)
        assert reclaim_stale(tmp_path) == (0, 0)
        assert _files(tmp_path) == before
        proc.stdin.write("close\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        assert _files(tmp_path) == []
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_removes_the_files(tmp_path):
    proc = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # still ends the way SIGTERM ends a process
    assert _files(tmp_path) == []
