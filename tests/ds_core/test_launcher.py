"""``ds run``: command construction for every launcher, and real launches on this machine.

Multi-node launches run here with stub ``ssh``/``pdsh`` executables first on PATH: they run the
remote command locally, so two "hosts" become two torchrun agents on one machine that must still
form one world through the rendezvous.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

import ds_core.cli.run as run_mod
from ds_core.cli.node import decode_world, encode_world, find_host, node_command, visible_devices
from ds_core.cli.run import build_plan, exported_env, parse_args, run_processes
from ds_core.errors import LaunchError
from ds_core.testing import free_port

WORKER = """\
import json, os, sys
import torch
import torch.distributed as dist

out = sys.argv[1]
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
record = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                          "GROUP_RANK", "DS_TEST_MARK")}
record["sum"] = t.item()
record["world"] = dist.get_world_size()
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
"""

FAILING = """\
import os, sys
sys.exit(3 if os.environ["RANK"] == "1" else 0)
"""

# Ignores ssh options, drops the host and runs the remote command here.
SSH_STUB = """#!/usr/bin/env bash
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-i|-l|-F|-J) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift  # the host
exec bash -c "$*"
"""

# Runs the command once per -w host, concurrently, with %h replaced; exits with the largest code.
PDSH_STUB = """#!/usr/bin/env bash
hosts=""
while [ $# -gt 0 ]; do
  case "$1" in
    -w) hosts="$2"; shift 2 ;;
    -f|-R|-l|-t|-u) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
cmd="$*"
IFS=, read -ra names <<< "$hosts"
pids=()
for h in "${names[@]}"; do
  bash -c "${cmd//%h/$h}" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  wait "$p"; r=$?
  [ "$r" -gt "$rc" ] && rc=$r
done
exit $rc
"""


@pytest.fixture
def no_default_hostfile(monkeypatch, tmp_path):
    monkeypatch.setattr(run_mod, "DEFAULT_HOSTFILE", str(tmp_path / "no-such-hostfile"))


def _plan(argv, tmp_path, environ=None):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return build_plan(parse_args(argv), environ=environ or {}, cwd=str(tmp_path), home=str(home))


def _hostfile(tmp_path, text="node-a slots=2\nnode-b slots=2\n"):
    path = tmp_path / "hostfile"
    path.write_text(text)
    return str(path)


# -- command construction ----------------------------------------------------------------------


def test_single_node_wraps_torchrun_standalone(tmp_path, no_default_hostfile):
    plan = _plan(["--nproc", "2", "train.py", "--lr", "0.1"], tmp_path)
    assert plan.launcher == "local"
    assert plan.commands == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", "--", "train.py", "--lr", "0.1"]]
    # DeepSpeed's spelling is the same flag; flags after the script belong to the script
    cmd = _plan(["--num_gpus", "2", "train.py", "--nproc", "9"], tmp_path).commands[0]
    assert cmd[:-4] == plan.commands[0][:-4] and cmd[-4:] == ["--", "train.py", "--nproc", "9"]


def test_single_node_modes_and_explicit_port(tmp_path, no_default_hostfile):
    cmd = _plan(["--nproc", "1", "--module", "pkg.train", "-x"], tmp_path).commands[0]
    assert cmd[-4:] == ["--module", "--", "pkg.train", "-x"]
    cmd = _plan(["--nproc", "1", "--no_python", "./run.sh"], tmp_path).commands[0]
    assert cmd[-3:] == ["--no-python", "--", "./run.sh"]
    cmd = _plan(["--nproc", "2", "--master_port", "1234", "t.py"], tmp_path).commands[0]
    assert "--standalone" not in cmd
    assert cmd[cmd.index("--master_port") + 1] == "1234"
    assert cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"
    with pytest.raises(LaunchError, match="--module and --no_python"):
        parse_args(["--module", "--no_python", "x"])


def test_num_nodes_without_hostfile_is_an_error(tmp_path, no_default_hostfile):
    with pytest.raises(LaunchError, match="--num_nodes 2 needs a hostfile"):
        _plan(["--num_nodes", "2", "t.py"], tmp_path)


def test_default_hostfile_is_used_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "DEFAULT_HOSTFILE", _hostfile(tmp_path))
    plan = _plan(["--launcher", "ssh", "t.py"], tmp_path)
    assert plan.launcher == "ssh" and list(plan.resources) == ["node-a", "node-b"]


def test_one_active_host_runs_locally_unless_forced(tmp_path):
    hf = _hostfile(tmp_path)
    plan = _plan(["-H", hf, "--include", "node-b:0", "t.py"], tmp_path)
    assert plan.launcher == "local" and plan.resources == {"node-b": [0]}
    plan = _plan(["-H", hf, "--include", "node-b:0", "--force_multi", "--launcher", "ssh", "t.py"],
                 tmp_path)
    assert plan.launcher == "ssh" and len(plan.commands) == 1


def test_ssh_commands(tmp_path):
    hf = _hostfile(tmp_path)
    environ = {"PYTHONPATH": "/src", "NCCL_DEBUG": "INFO", "DS_ACCELERATOR": "cpu", "HOME": "/x",
               "SECRET": "no"}
    (tmp_path / ".deepspeed_env").write_text("# project\nDS_TEST_MARK=hello world\nOTHER=1\n")
    plan = _plan(["-H", hf, "--launcher", "ssh", "--exclude", "node-b:1", "--launcher_args",
                  "-o StrictHostKeyChecking=no", "t.py", "--flag"], tmp_path, environ)
    assert plan.launcher == "ssh" and len(plan.commands) == 2
    for rank, (cmd, host, nproc) in enumerate(zip(plan.commands, ["node-a", "node-b"], [2, 1])):
        assert cmd[:5] == ["ssh", "-o", "StrictHostKeyChecking=no", "--", host]
        remote = cmd[5]
        assert remote.startswith(f"cd {shlex.quote(str(tmp_path))} && export ")
        for part in ("PYTHONPATH=/src", "NCCL_DEBUG=INFO", "DS_ACCELERATOR=cpu",
                     "DS_TEST_MARK='hello world'", "OTHER=1"):
            assert part in remote
        assert "SECRET" not in remote and "HOME=" not in remote
        torchrun = shlex.split(remote.split(" && exec ", 1)[1])
        assert torchrun == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                            "--node_rank", str(rank), "--nproc_per_node", str(nproc),
                            "--master_addr", "node-a", "--master_port", "29500", "--", "t.py", "--flag"]


def test_pdsh_command_and_node_resolution(tmp_path):
    hf = _hostfile(tmp_path, "node-a slots=4\nnode-b slots=4\n")
    plan = _plan(["-H", hf, "--launcher", "pdsh", "--include", "node-a:1,3@node-b",
                  "--master_port", "6000", "t.py"], tmp_path)
    (cmd,) = plan.commands
    assert cmd[:6] == ["pdsh", "-S", "-f", "1024", "-w", "node-a,node-b"]
    assert plan.extra_env == {"PDSH_RCMD_TYPE": "ssh"}
    node = shlex.split(cmd[6].split(" && exec ", 1)[1])
    assert node[:5] == [sys.executable, "-m", "ds_core.cli.node", "--host", "%h"]
    assert node[-3:] == ["--", "--", "t.py"]
    world = decode_world(node[node.index("--world-info") + 1])
    assert world["hosts"] == [["node-a", [1, 3], 4], ["node-b", [0, 1, 2, 3], 4]]
    # what each node then runs (a cuda-like accelerator hides the unused devices)
    world["visible_env"] = "CUDA_VISIBLE_DEVICES"
    argv, env = node_command(world, find_host(world, "node-a"), ["t.py"], "py")
    assert env == {"CUDA_VISIBLE_DEVICES": "1,3"}
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("--node_rank") + 1] == "0"
    argv, env = node_command(world, find_host(world, "node-b"), ["t.py"], "py")
    assert env == {} and argv[argv.index("--node_rank") + 1] == "1"
    assert argv[argv.index("--master_port") + 1] == "6000"


def test_node_runner_errors():
    world = {"hosts": [["node-a", [0], 1]], "master_addr": "node-a", "master_port": 1}
    assert decode_world(encode_world(world)) == world
    with pytest.raises(LaunchError, match="'node-z'.*is not one of the launch's hosts"):
        find_host(world, "node-z")
    with pytest.raises(LaunchError, match="not base64 JSON"):
        decode_world("%%%")


def test_visible_devices_rules():
    assert visible_devices([0, 1], "CUDA_VISIBLE_DEVICES") == {}  # prefix: nothing to hide
    assert visible_devices([1, 3], None) == {}  # cpu: the process count alone
    assert visible_devices([1, 3], "CUDA_VISIBLE_DEVICES") == {"CUDA_VISIBLE_DEVICES": "1,3"}
    # indices count inside an existing mask
    assert visible_devices([1], "CUDA_VISIBLE_DEVICES", "4,5") == {"CUDA_VISIBLE_DEVICES": "5"}
    with pytest.raises(LaunchError, match="shows only 2 device"):
        visible_devices([3], "CUDA_VISIBLE_DEVICES", "4,5")


def test_slurm_command_construction(tmp_path, capsys):
    hf = _hostfile(tmp_path, "n1 slots=8\nn2 slots=8\nn3 slots=8\n")
    plan = _plan(["-H", hf, "--launcher", "slurm", "--num_nodes", "2", "--num_gpus", "4",
                  "--master_port", "7000", "train.py", "--big"], tmp_path,
                 {"SLURM_JOB_ID": "42"})
    assert plan.commands == [[
        "srun", "--nodes", "2", "--ntasks-per-node", "1", "--nodelist", "n1,n2",
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "n1:7000", "--rdzv_id", "ds-42",
        "--", "train.py", "--big"]]
    # without a hostfile: sizes from the flags
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "DEFAULT_HOSTFILE", str(tmp_path / "none"))
        mp.chdir(tmp_path)
        assert run_mod.main(["--launcher", "slurm", "--num_nodes", "3", "--nproc", "2",
                             "--master_addr", "head", "--dry-run", "-m", "pkg.train"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("env 'PYTHONWARNINGS=") and " srun --nodes 3 --ntasks-per-node 1 " in line
    assert "--nnodes 3 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint head:29500" in line
    assert line.endswith("--module -- pkg.train")


def test_slurm_errors(tmp_path, no_default_hostfile):
    with pytest.raises(LaunchError, match="needs --nproc"):
        _plan(["--launcher", "slurm", "--num_nodes", "2", "t.py"], tmp_path)
    with pytest.raises(LaunchError, match="no --master_addr"):
        _plan(["--launcher", "slurm", "--nproc", "2", "t.py"], tmp_path)
    hf = _hostfile(tmp_path)
    with pytest.raises(LaunchError, match="slots differ between hosts"):
        _plan(["-H", hf, "--launcher", "slurm", "--exclude", "node-a:1", "t.py"], tmp_path)


def test_env_file_errors_and_precedence(tmp_path):
    home, proj = tmp_path / "home", tmp_path / "proj"
    home.mkdir()
    proj.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (proj / ".deepspeed_env").write_text("B=proj\n")
    assert exported_env({"TORCH_X": "1", "PATH": "/bin"}, [str(home), str(proj)]) == {
        "TORCH_X": "1", "A": "home", "B": "proj"}
    (proj / ".deepspeed_env").write_text("ok=1\nnot a line\n")
    with pytest.raises(LaunchError, match=r"\.deepspeed_env:2: 'not a line' is not 'NAME=VALUE'"):
        exported_env({}, [str(proj)])


def test_cli_reports_launch_errors(tmp_path):
    hf = _hostfile(tmp_path, "a slots=1\na slots=1\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from ds_core.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "run", "-H", hf, "t.py"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"ds run: error: {hf}:2: 'a slots=1' lists host 'a' again" in proc.stderr


# -- the process runner ------------------------------------------------------------------------


def test_runner_stops_the_others_and_returns_the_first_failure():
    start = time.monotonic()
    code = run_processes([["bash", "-c", "sleep 60 & wait"], ["bash", "-c", "sleep 0.3; exit 3"]])
    assert code == 3
    assert time.monotonic() - start < 15  # the sleeper (and its child) were stopped
    assert run_processes([["true"], ["bash", "-c", "exit 0"]]) == 0
    with pytest.raises(LaunchError, match="cannot start 'no-such-launcher-binary'"):
        run_processes([["no-such-launcher-binary"]])


# -- real launches -----------------------------------------------------------------------------


def _env(tmp_path, stub_dir=None):
    env = dict(os.environ)
    env.update(TORCH_CPP_LOG_LEVEL="ERROR", OMP_NUM_THREADS="1", HOME=str(tmp_path / "home"),
               LOGLEVEL="WARNING", PYTHONWARNINGS="ignore")
    env.pop("DS_TEST_MARK", None)
    if stub_dir is not None:
        env["PATH"] = f"{stub_dir}{os.pathsep}{env['PATH']}"
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def _ds_run(args, tmp_path, env, timeout=120):
    cmd = [sys.executable, "-c", "import sys; from ds_core.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "run", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _stub(tmp_path, name, text):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def _records(out_dir):
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")),
                  key=lambda r: int(r["RANK"]))


def test_single_node_real_run(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "out"
    script.write_text(WORKER)
    out.mkdir()
    proc = _ds_run(["--nproc", "2", str(script), str(out)], tmp_path, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    assert [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"]) for r in records] == [
        ("0", "2", "0"), ("1", "2", "1")]
    assert all(r["sum"] == 3.0 and r["world"] == 2 for r in records)


def test_single_node_failure_propagates(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    proc = _ds_run(["--nproc", "2", str(script)], tmp_path, _env(tmp_path))
    # torchrun exits 1 when a worker fails and names the worker's own code (3) in its report
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "exitcode  : 3" in proc.stderr


@pytest.mark.serial  # picks a free port for its rendezvous
def test_multi_node_over_ssh_forms_one_world(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "out"
    script.write_text(WORKER)
    out.mkdir()
    hf = _hostfile(tmp_path, "node-a slots=2\nnode-b slots=2\n")
    (tmp_path / ".deepspeed_env").write_text("DS_TEST_MARK=from-env-file\n")
    bin_dir = _stub(tmp_path, "ssh", SSH_STUB)
    proc = _ds_run(["--hostfile", hf, "--launcher", "ssh", "--exclude", "node-b:1",
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    str(script), str(out)], tmp_path, _env(tmp_path, bin_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    # node-a runs 2 ranks, node-b 1: one world of 3, each rank once, node ranks from the hostfile
    assert [r["RANK"] for r in records] == ["0", "1", "2"]
    assert {r["WORLD_SIZE"] for r in records} == {"3"} and {r["world"] for r in records} == {3}
    assert [(r["GROUP_RANK"], r["LOCAL_RANK"]) for r in records] == [("0", "0"), ("0", "1"),
                                                                    ("1", "0")]
    assert all(r["sum"] == 6.0 for r in records)  # 1 + 2 + 3
    assert {r["DS_TEST_MARK"] for r in records} == {"from-env-file"}


@pytest.mark.serial  # picks a free port for its rendezvous
def test_multi_node_over_pdsh_forms_one_world(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "out"
    script.write_text(WORKER)
    out.mkdir()
    hf = _hostfile(tmp_path, "node-a slots=1\nnode-b slots=2\n")
    bin_dir = _stub(tmp_path, "pdsh", PDSH_STUB)
    proc = _ds_run(["--hostfile", hf, "--include", "node-a@node-b:0", "--no_ssh_check",
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    str(script), str(out)], tmp_path, _env(tmp_path, bin_dir))  # pdsh on PATH: default
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    assert [(r["RANK"], r["GROUP_RANK"], r["LOCAL_RANK"]) for r in records] == [
        ("0", "0", "0"), ("1", "1", "0")]
    assert all(r["sum"] == 3.0 and r["world"] == 2 for r in records)
