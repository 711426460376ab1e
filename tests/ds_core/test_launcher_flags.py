"""``ds run`` with the flags DeepSpeed users have in their scripts, the script's own flags, hostile
hostfiles, and which ``ds`` is on PATH. Real launches use this machine's two ranks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

import ds_core.cli.run as run_mod
from ds_core.cli.hostfile import filter_resources, parse_hostfile, read_hostfile
from ds_core.cli.report import ds_on_path
from ds_core.cli.run import build_plan, check_ssh, parse_args, split_command_line
from ds_core.cli.worker import cores_for_rank, parse_core_list
from ds_core.errors import LaunchError

# Records what each rank saw: its argv, cores, thread count, and the pid file of the launcher.
RECORDER = """\
import json, os, sys
rank = os.environ["RANK"]
def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
print(f"hello from rank {rank}", flush=True)
print(f"warning on stderr from rank {rank}", file=sys.stderr, flush=True)
out = {"argv": sys.argv[1:], "cores": sorted(os.sched_getaffinity(0)),
       "omp": os.environ.get("OMP_NUM_THREADS"), "pid_files": {}}
torchrun = os.getppid()
ds_run = parent(torchrun)
path = f"/tmp/{ds_run}.deepspeed"
if os.path.exists(path):
    out["pid_files"][path] = open(path).read().split()
out["torchrun"] = torchrun
with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
"""


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.update(TORCH_CPP_LOG_LEVEL="ERROR", OMP_NUM_THREADS="1", LOGLEVEL="WARNING", PYTHONWARNINGS="ignore",
               OUT=str(tmp_path / "out"), **extra)
    (tmp_path / "out").mkdir(exist_ok=True)
    return env


def _ds(args, tmp_path, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "ds_core", "run", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _records(tmp_path):
    return [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]


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


# -- the script's own arguments ------------------------------------------------------------------

def test_script_flags_reach_the_script_untouched(tmp_path):
    script = tmp_path / "rec.py"
    script.write_text(RECORDER)
    own = ["--nproc", "9", "--log", "x", "--node", "3", "--master_port", "5", "-H", "h", "--", "y"]
    proc = _ds(["--nproc", "2", str(script), *own], tmp_path, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["argv"] for r in _records(tmp_path)] == [own, own]


def test_split_command_line():
    assert split_command_line(["--nproc", "2", "t.py", "--nproc", "3"]) == (["--nproc", "2"], ["t.py", "--nproc", "3"])
    assert split_command_line(["--master_port=5", "-m", "pkg", "-x"]) == (["--master_port=5", "-m"], ["pkg", "-x"])
    assert split_command_line(["--nproc", "2", "--", "--odd-name.py"]) == (["--nproc", "2"], ["--odd-name.py"])
    with pytest.raises(LaunchError, match=r"unknown option '--nprocs' before the script \(did you mean '--nproc'"):
        split_command_line(["--nprocs", "2", "t.py"])
    with pytest.raises(LaunchError, match="no training script given"):
        parse_args(["--nproc", "2"])


# -- DeepSpeed's launcher flags ------------------------------------------------------------------

def test_num_accelerators_is_num_gpus(tmp_path, no_default_hostfile):
    assert parse_args(["--num_accelerators", "3", "t.py"]).nproc == 3


def test_refused_flags_say_why():
    for argv, fragment in ((["--autotuning", "tune"], "no autotuner"),
                           (["--elastic_training"], "elastic membership is not supported"),
                           (["--node_rank", "1"], "applies only with --no_ssh"),
                           (["--no_ssh"], "needs its index: add --node_rank"),
                           (["--no_local_rank", "--local_rank_arg"], "contradict"),
                           (["--bind_core_list", "0-3"], "add --bind_cores_to_rank"),
                           (["--bind_cores_to_rank", "--bind_core_list", "3-1"], "not a core number or a range"),
                           (["--ssh_port", "70000"], "--ssh_port 70000: must be a TCP port")):
        with pytest.raises(LaunchError, match=fragment):
            parse_args([*argv, "t.py"])


def test_no_ssh_starts_this_node_of_the_hostfile(tmp_path):
    hf = _hostfile(tmp_path, "node-a slots=2\nnode-b slots=1\n")
    plan = _plan(["-H", hf, "--no_ssh", "--node_rank", "1", "t.py"], tmp_path)
    (cmd,) = plan.commands
    assert plan.launcher == "local" and plan.resources == {"node-b": [0]}
    for flag, value in (("--nnodes", "2"), ("--node_rank", "1"), ("--nproc_per_node", "1"),
                        ("--master_addr", "node-a"), ("--master_port", "29500")):
        assert cmd[cmd.index(flag) + 1] == value
    with pytest.raises(LaunchError, match="has 2 active host"):
        _plan(["-H", hf, "--no_ssh", "--node_rank", "2", "t.py"], tmp_path)


def test_no_ssh_without_hostfile(tmp_path, no_default_hostfile):
    cmd = _plan(["--no_ssh", "--node_rank", "1", "--num_nodes", "3", "--nproc", "4", "--master_addr", "10.0.0.1",
                 "t.py"], tmp_path).commands[0]
    assert cmd[cmd.index("--nnodes") + 1] == "3" and cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"
    with pytest.raises(LaunchError, match="needs --num_nodes N and --master_addr"):
        _plan(["--no_ssh", "--node_rank", "0", "--nproc", "2", "t.py"], tmp_path)


def test_ssh_port_and_venv_script(tmp_path):
    hf = _hostfile(tmp_path)
    plan = _plan(["-H", hf, "--launcher", "ssh", "--ssh_port", "2222", "--venv_script", "/opt/env.sh", "t.py"],
                 tmp_path)
    for cmd in plan.commands:
        assert cmd[1:3] == ["-p", "2222"] and cmd[-1].startswith(". /opt/env.sh && cd ")
    assert all(c[c.index("-p") + 1] == "2222" for c in plan.ssh_check)
    plan = _plan(["-H", hf, "--launcher", "pdsh", "--ssh_port", "2222", "t.py"], tmp_path,
                 {"PDSH_SSH_ARGS_APPEND": "-q"})
    assert plan.extra_env["PDSH_SSH_ARGS_APPEND"] == "-q -p 2222"
    with pytest.raises(LaunchError, match="--ssh_port does not apply to --launcher slurm"):
        _plan(["-H", hf, "--launcher", "slurm", "--ssh_port", "2222", "t.py"], tmp_path)
    plan = _plan(["-H", hf, "--launcher", "ssh", "--no_ssh_check", "t.py"], tmp_path)
    assert plan.ssh_check == []


def test_ssh_check_names_unreachable_hosts(tmp_path):
    stub = tmp_path / "bin" / "ssh"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\nfor a; do h=$last; last=$a; done\n'
                    'case "$h" in node-b) echo "Permission denied (publickey)." >&2; exit 255;; esac\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(LaunchError, match=r"cannot reach node-b \(Permission denied \(publickey\).\) over ssh"):
        check_ssh([[str(stub), "--", "node-a", "true"], [str(stub), "--", "node-b", "true"]])


def test_per_rank_setup_binds_cores_logs_and_passes_local_rank(tmp_path):
    script = tmp_path / "rec.py"
    script.write_text(RECORDER)
    logs = tmp_path / "logs"
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("needs 2 usable cores to give each rank its own")
    proc = _ds(["--nproc", "2", "--bind_cores_to_rank", "--bind_core_list", ",".join(map(str, cores)),
                "--enable_each_rank_log", str(logs), "--local_rank_arg", "--save_pid", str(script), "--x", "1"],
               tmp_path, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["argv"] for r in records] == [["--local_rank=0", "--x", "1"], ["--local_rank=1", "--x", "1"]]
    assert [r["cores"] for r in records] == [[cores[0]], [cores[1]]]
    assert [r["omp"] for r in records] == ["1", "1"]
    # the pid file named by DeepSpeed's convention held torchrun's pid while the run lasted, then went away
    (files,) = {json.dumps(r["pid_files"]) for r in records}
    ((path, pids),) = json.loads(files).items()
    assert pids == [str(records[0]["torchrun"])] and not os.path.exists(path)
    by_rank = {p.name.rsplit("_", 1)[1]: p.read_text() for p in logs.iterdir()}
    assert sorted(by_rank) == ["rank0.log", "rank1.log"]
    for rank in (0, 1):
        text = by_rank[f"rank{rank}.log"]
        assert f"hello from rank {rank}" in text and f"warning on stderr from rank {rank}" in text


def test_core_list_parsing():
    assert parse_core_list("0,2-4,7") == [0, 2, 3, 4, 7]
    assert cores_for_rank(list(range(8)), 1, 3) == [2, 3]
    with pytest.raises(LaunchError, match="lists core 2 twice"):
        parse_core_list("1-3,2")
    with pytest.raises(LaunchError, match="2 core\\(s\\) .* for 4 ranks"):
        cores_for_rank([0, 1], 0, 4)


# -- hostile hostfiles -----------------------------------------------------------------------------

@pytest.mark.parametrize("slots", ["99999999999999999999", "5000", "١"])
def test_absurd_slot_counts_are_refused(slots):
    with pytest.raises(LaunchError, match=f"slots={slots}: each line must be .* of at most 4096"):
        parse_hostfile(f"node slots={slots}\n")


def test_non_utf8_hostfile_names_the_line(tmp_path):
    path = tmp_path / "hosts"
    path.write_bytes(b"node-a slots=1\nn\xe9ud slots=1\n")
    with pytest.raises(LaunchError, match=r"hosts:2: byte b'\\xe9' is not UTF-8 text"):
        read_hostfile(str(path))


@pytest.mark.parametrize("host", ["-oProxyJump", "a;b", "h$(id)", "bad..dots", "x" * 64])
def test_host_names_are_validated(host):
    with pytest.raises(LaunchError, match="is not a host name"):
        parse_hostfile(f"{host} slots=1\n")


def test_empty_include_is_an_error_not_all_hosts():
    with pytest.raises(LaunchError, match="--include is empty"):
        filter_resources({"a": 1, "b": 1}, include="")
    with pytest.raises(LaunchError, match="--exclude is empty"):
        filter_resources({"a": 1, "b": 1}, exclude="")


def test_first_lines_are_ours_even_without_numpy(tmp_path):
    script = tmp_path / "rec.py"
    script.write_text(RECORDER)
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _NoNumpy:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'numpy':\n            raise ModuleNotFoundError(\"No module named 'numpy'\")\n"
        "sys.meta_path.insert(0, _NoNumpy())\n")
    env = _env(tmp_path, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTHONWARNINGS")
    proc = _ds(["--nproc", "2", str(script)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Failed to initialize NumPy" not in proc.stderr
    assert proc.stderr.startswith("ds run: starting 2 processes on this machine"), proc.stderr[:500]


# -- which ds ------------------------------------------------------------------------------------

def test_report_says_when_ds_on_path_is_deepspeeds(tmp_path):
    fake = tmp_path / "ds"
    fake.write_text("#!/usr/bin/python3\nfrom deepspeed.launcher.runner import main\nmain()\n")
    fake.chmod(0o755)
    info = ds_on_path(str(tmp_path))
    assert info["owner"] == "deepspeed" and "python -m ds_core" in info["note"]
    assert ds_on_path(str(tmp_path / "empty"))["owner"] is None


def test_python_m_ds_core_always_works(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no ds on PATH at all
    proc = subprocess.run([sys.executable, "-m", "ds_core", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "run" in proc.stdout and "report" in proc.stdout
