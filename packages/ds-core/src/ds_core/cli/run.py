"""``ds run``: start a training script on one node or many, through torchrun on every node.

The launch is a pipeline of small steps, each testable alone:

1. :func:`parse_args` — DeepSpeed-compatible flags (``--num_gpus``, ``--hostfile``, ``--include``...);
   :func:`split_command_line` hands everything after the script to the script, untouched.
2. :func:`resolve_resources` — hostfile (or this machine) -> filtered ``{host: [slots]}``.
3. :func:`build_plan` — the commands to start, the environment they need, which launcher runs them.
4. :func:`run_processes` — start them together, stop the rest when one fails, return the first
   non-zero exit code.

One node runs ``python -m torch.distributed.run --standalone`` here. Several nodes share one
static rendezvous (``--nnodes/--node_rank/--master_addr/--master_port``) started over ssh (one
process per host) or pdsh (one call; each node resolves its rank in :mod:`ds_core.cli.node`);
SLURM gets one ``srun`` whose tasks meet at a c10d rendezvous, since srun hands every node the same
command line. Nothing is started until every input has been checked.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import LaunchError, closest
from .hostfile import DEFAULT_HOSTFILE, Resources, filter_resources, read_hostfile
from .node import DEFAULT_MASTER_PORT, encode_world, node_command, torchrun_command, visible_devices
from .worker import parse_core_list

__all__ = [
    "DEFAULT_MASTER_PORT",
    "EXPORT_PREFIXES",
    "ENV_FILE",
    "LaunchPlan",
    "parse_args",
    "resolve_resources",
    "read_env_file",
    "exported_env",
    "program_args",
    "ssh_commands",
    "pdsh_command",
    "slurm_command",
    "build_plan",
    "run_processes",
    "main",
]

# Environment variables sent to remote nodes: exact names and prefixes (DeepSpeed sends a similar
# set; NCCL/UCX/FI tune the interconnect, DS_* and TORCH_* configure us and torch).
EXPORT_NAMES = ("PYTHONPATH",)
EXPORT_PREFIXES = ("NCCL_", "DS_", "TORCH_", "GLOO_", "UCX_", "FI_")
ENV_FILE = ".deepspeed_env"
LAUNCHERS = ("ssh", "pdsh", "slurm")
STOP_GRACE_S = 15.0


@dataclass
class LaunchPlan:
    """What ``ds run`` will start: ``commands``, concurrently, with ``extra_env`` added to ours."""

    launcher: str  # "local", "ssh", "pdsh" or "slurm"
    commands: list[list[str]]
    extra_env: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # flags without effect here, said once
    ssh_check: list[list[str]] = field(default_factory=list)  # run before the launch

    def describe(self) -> list[str]:
        """The commands as shell lines (what ``--dry-run`` prints)."""
        prefix = ["env", *(f"{k}={v}" for k, v in self.extra_env.items())] if self.extra_env else []
        return [shlex.join([*prefix, *cmd]) for cmd in self.commands]


# -- 1. arguments ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds run",
        usage="ds run [options] script [script arguments...]",
        description="Launch a training script with torchrun on this node, or on every node of a "
                    "DeepSpeed hostfile over ssh, pdsh or SLURM. Everything after the script is the "
                    "script's own (a '--' before the script also ends ds run's options).",
        epilog="example: ds run --nproc 2 examples/train_gpt.py --config examples/configs/gpt_cpu.json",
        allow_abbrev=False,
    )
    a = p.add_argument
    a("--nproc", "--num_gpus", "--num-gpus", "--num_accelerators", "--num-accelerators", "--nproc_per_node",
      "--nproc-per-node", dest="nproc", type=int, default=None, metavar="N",
      help="processes per node; with a hostfile, caps each host's slots (default: every slot; "
           "without one, the accelerator's device count)")
    a("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=None, metavar="K",
      help="use the first K hosts of the hostfile (default: all)")
    a("--hostfile", "-H", default=None,
      help=f"DeepSpeed hostfile, lines 'host slots=N' (default: {DEFAULT_HOSTFILE} if it exists)")
    a("--include", "-i", default=None, help="hosts/slots to use, e.g. 'h1@h2:0,2'")
    a("--exclude", "-e", default=None, help="hosts/slots to skip, e.g. 'h1:3@h4'")
    a("--master_addr", "--master-addr", dest="master_addr", default=None,
      help="address of node rank 0 (default: the first host; single node: a local rendezvous)")
    a("--master_port", "--master-port", dest="master_port", type=int, default=None,
      help=f"rendezvous port (default: {DEFAULT_MASTER_PORT} multi-node; a free port on one node)")
    a("--launcher", choices=LAUNCHERS, default=None,
      help="how to reach other nodes (default: pdsh if on PATH, else ssh)")
    a("--launcher_args", "--launcher-args", dest="launcher_args", default="",
      help="extra arguments for ssh/pdsh/srun, one shell-quoted string (a single option: "
           "--launcher_args=-q)")
    a("--force_multi", "--force-multi", dest="force_multi", action="store_true",
      help="use the multi-node launcher even for one host")
    a("--no_ssh", "--no-ssh", dest="no_ssh", action="store_true",
      help="start only this node's processes; run 'ds run --no_ssh --node_rank I ...' on every node yourself")
    a("--node_rank", "--node-rank", dest="node_rank", type=int, default=None, metavar="I",
      help="with --no_ssh: this node's index among the active hosts (0..N-1)")
    a("--no_ssh_check", "--no-ssh-check", dest="no_ssh_check", action="store_true",
      help="skip checking that every host answers over ssh before a multi-node launch")
    a("--ssh_port", "--ssh-port", dest="ssh_port", type=int, default=None, metavar="PORT",
      help="ssh port of the nodes (ssh -p; pdsh through PDSH_SSH_ARGS_APPEND)")
    a("--venv_script", "--venv-script", dest="venv_script", default=None, metavar="FILE",
      help="shell script sourced on every remote node before the launch (ssh, pdsh)")
    a("--module", "-m", action="store_true", help="run the script as a module (python -m)")
    a("--no_python", "--no-python", dest="no_python", action="store_true",
      help="run the script as an executable, without python")
    a("--no_local_rank", "--no-local-rank", dest="no_local_rank", action="store_true",
      help="do not append --local_rank=N to the script's arguments (the default here; see --local_rank_arg)")
    a("--local_rank_arg", "--local-rank-arg", dest="local_rank_arg", action="store_true",
      help="append --local_rank=N to the script's arguments, as DeepSpeed's launcher does by default")
    a("--bind_cores_to_rank", "--bind-cores-to-rank", dest="bind_cores_to_rank", action="store_true",
      help="give each local rank its own share of the cores and set OMP_NUM_THREADS to its size")
    a("--bind_core_list", "--bind-core-list", dest="bind_core_list", default=None, metavar="LIST",
      help="cores to share out with --bind_cores_to_rank, e.g. 0-7,16-23 (default: the usable ones)")
    a("--enable_each_rank_log", "--enable-each-rank-log", dest="enable_each_rank_log", default=None,
      metavar="DIR", help="write each rank's stdout and stderr to DIR/<start time>_rank<RANK>.log")
    a("--save_pid", "--save-pid", dest="save_pid", action="store_true",
      help="write /tmp/<pid of ds run>.deepspeed holding the pids ds run started; removed at exit")
    a("--log_level", "--log-level", dest="log_level", default=None,
      choices=("debug", "info", "warning", "error", "critical"), help="torchrun's log level (LOGLEVEL)")
    a("--quiet", "-q", action="store_true", help="as --log_level error")
    a("--dry-run", "--dry_run", "--print-cmd", "--print_cmd", dest="dry_run", action="store_true",
      help="print the commands that would run, start nothing")
    # DeepSpeed flags with no equivalent here: accepted by the parser so the refusal can say why
    for flag in ("--autotuning", "--min_elastic_nodes", "--max_elastic_nodes"):
        a(flag, default=None, help=argparse.SUPPRESS)
    a("--elastic_training", action="store_true", help=argparse.SUPPRESS)
    return p


REFUSED = {
    "autotuning": "--autotuning: ds has no autotuner; pick the micro-batch size and ZeRO stage by hand (see "
                  "docs/zero.md for the memory model), or run DeepSpeed's autotuner and keep its config",
    "elastic_training": "--elastic_training: elastic membership is not supported; ds run starts a fixed world. "
                        "Checkpoints load at any world size: restart with another --num_nodes to resize",
    "min_elastic_nodes": "--min_elastic_nodes needs elastic training, which ds run does not support",
    "max_elastic_nodes": "--max_elastic_nodes needs elastic training, which ds run does not support",
}


def split_command_line(argv: Sequence[str], parser: argparse.ArgumentParser | None = None
                       ) -> tuple[list[str], list[str]]:
    """``(ds run's own arguments, [script, *its arguments])``.

    The first word that is neither one of our options nor an option's value is the script; a ``--``
    ends our options explicitly. Nothing after the script is looked at, so a script's own
    ``--nproc 9`` or ``--log x`` reaches the script untouched.
    """
    parser = parser or _parser()
    arity = {opt: (0 if action.nargs == 0 else 1) for action in parser._actions for opt in action.option_strings}
    argv = list(argv)
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[:i], argv[i + 1:]
        if not word.startswith("-") or word == "-":
            return argv[:i], argv[i:]
        name = word.split("=", 1)[0]
        if name not in arity:
            known = [o for o in arity if o.startswith("--")]
            raise LaunchError(f"unknown option {name!r} before the script{closest(name, known)}; ds run's options "
                              f"come before the script, the script's own after it (see 'ds run --help')")
        i += 1 if "=" in word or arity[name] == 0 else 2
    return argv, []


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser()
    ours, program = split_command_line(argv, parser)
    args = parser.parse_args(ours)  # prints the help and exits for -h/--help
    if not program:
        raise LaunchError("no training script given: ds run [options] script.py [script arguments]")
    args.script, args.script_args = program[0], program[1:]
    for key, message in REFUSED.items():
        if getattr(args, key):
            raise LaunchError(message)
    if args.module and args.no_python:
        raise LaunchError("--module and --no_python were both given: a module needs python; keep "
                          "one of them")
    for flag, value in (("--nproc/--num_gpus", args.nproc), ("--num_nodes", args.num_nodes)):
        if value is not None and value < 1:
            raise LaunchError(f"{flag} {value}: must be a positive integer")
    for flag, port in (("--master_port", args.master_port), ("--ssh_port", args.ssh_port)):
        if port is not None and not 0 < port < 65536:
            raise LaunchError(f"{flag} {port}: must be a TCP port in 1..65535")
    if args.node_rank is not None and not args.no_ssh:
        raise LaunchError(f"--node_rank {args.node_rank} applies only with --no_ssh (each node started by hand); "
                          f"otherwise ds run numbers the nodes from the hostfile: drop --node_rank")
    if args.no_ssh and args.node_rank is None:
        raise LaunchError("--no_ssh starts this node only and needs its index: add --node_rank I (0 on the "
                          "master, 1..N-1 on the others, in hostfile order)")
    if args.no_ssh and args.node_rank < 0:
        raise LaunchError(f"--node_rank {args.node_rank}: must be 0 or more")
    if args.no_local_rank and args.local_rank_arg:
        raise LaunchError("--no_local_rank and --local_rank_arg contradict each other; keep one")
    if args.bind_core_list is not None:
        if not args.bind_cores_to_rank:
            raise LaunchError("--bind_core_list lists the cores that --bind_cores_to_rank shares out; add "
                              "--bind_cores_to_rank (or drop --bind_core_list)")
        parse_core_list(args.bind_core_list)
    if args.enable_each_rank_log in ("None", ""):
        args.enable_each_rank_log = None  # DeepSpeed's spelling of "off"
    if args.enable_each_rank_log is not None and os.path.isfile(args.enable_each_rank_log):
        raise LaunchError(f"--enable_each_rank_log {args.enable_each_rank_log!r} is a file; it takes a directory "
                          f"for the per-rank logs")
    return args


def _worker_args(args: argparse.Namespace, log_prefix: str | None) -> list[str] | None:
    """``ds_core.cli.worker``'s options when a flag needs per-rank set-up, else None."""
    if not (args.bind_cores_to_rank or args.local_rank_arg or args.enable_each_rank_log):
        return None
    out = ["--mode", "module" if args.module else "exec" if args.no_python else "python"]
    if args.bind_cores_to_rank:
        out += ["--bind-cores", args.bind_core_list or "all"]
    if args.local_rank_arg:
        out.append("--local-rank-arg")
    if args.enable_each_rank_log:
        out += ["--rank-log", os.path.join(os.path.abspath(args.enable_each_rank_log), log_prefix or "log")]
    return out


def program_args(args: argparse.Namespace, log_prefix: str | None = None) -> list[str]:
    """torchrun's trailing part: mode flags, ``--``, the script and its arguments.

    The ``--`` keeps torchrun's parser off the script's arguments (it would take ``--nproc`` for an
    ambiguous abbreviation of its own ``--nproc_per_node``).
    """
    worker = _worker_args(args, log_prefix)
    if worker is not None:
        return ["--module", "--", "ds_core.cli.worker", *worker, "--", args.script, *args.script_args]
    mode = ["--module"] if args.module else ["--no-python"] if args.no_python else []
    return [*mode, "--", args.script, *args.script_args]


# -- 2. resources ------------------------------------------------------------------------------


def _visible_env() -> str | None:
    from ..accelerator import get_accelerator

    return get_accelerator().visible_devices_env


def _is_prefix(slots: Sequence[int]) -> bool:
    """Slots ``0..n-1`` need no visible-devices mask, so the accelerator need not be asked."""
    return list(slots) == list(range(len(slots)))


def _local_device_count() -> int:
    from ..accelerator import get_accelerator

    try:
        return max(1, int(get_accelerator().device_count()))
    except Exception:  # an accelerator without device_count(): one device
        return 1


def resolve_resources(args: argparse.Namespace) -> tuple[Resources, dict[str, int] | None, str]:
    """Active ``{host: [slots]}``, the hostfile pool (``None`` without a hostfile) and its name."""
    path = args.hostfile
    if path is None and os.path.isfile(DEFAULT_HOSTFILE):
        path = DEFAULT_HOSTFILE
    if path is not None:
        pool = read_hostfile(path)
        active = filter_resources(pool, include=args.include, exclude=args.exclude,
                                  num_nodes=args.num_nodes, num_slots=args.nproc, source=path)
        return active, pool, path
    if args.launcher == "slurm":
        return {}, None, "SLURM"
    if args.num_nodes is not None and args.num_nodes > 1 and not args.no_ssh:
        raise LaunchError(
            f"--num_nodes {args.num_nodes} needs a hostfile (none given and {DEFAULT_HOSTFILE} does "
            f"not exist); pass --hostfile with lines 'host slots=N', or use --launcher slurm"
        )
    # This machine only: as many slots as devices, or as --nproc asks (cpu ranks share one device).
    # Counting devices imports torch (seconds), so only when the slots depend on it.
    need_count = args.nproc is None or args.include is not None or args.exclude is not None
    slots = max(_local_device_count() if need_count else 1, args.nproc or 0)
    pool = {"localhost": slots}
    active = filter_resources(pool, include=args.include, exclude=args.exclude,
                              num_slots=args.nproc, source="this machine (no hostfile)")
    return active, None, "this machine"


# -- 3. environment for remote nodes ----------------------------------------------------------


def read_env_file(path: str) -> dict[str, str]:
    """``NAME=VALUE`` lines of a ``.deepspeed_env`` file (blank lines and ``#`` comments allowed)."""
    result: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            name = name.strip()
            if not sep or not name.replace("_", "a").isalnum() or name[0].isdigit():
                raise LaunchError(
                    f"{path}:{number}: {line!r} is not 'NAME=VALUE' with NAME a shell variable "
                    f"name; fix or delete the line"
                )
            result[name] = value
    return result


def exported_env(environ: Mapping[str, str], dirs: Sequence[str]) -> dict[str, str]:
    """Variables to set on remote nodes: ours by name/prefix, then each ``dirs/.deepspeed_env``.

    Later directories win, so pass ``[home, cwd]`` for the project's file to override the user's.
    """
    out = {k: v for k, v in environ.items()
           if k in EXPORT_NAMES or k.startswith(EXPORT_PREFIXES)}
    for directory in dirs:
        path = os.path.join(directory, ENV_FILE)
        if os.path.isfile(path):
            out.update(read_env_file(path))
    return out


def _remote_shell(cwd: str, exports: Mapping[str, str], extra: Mapping[str, str],
                  cmd: Sequence[str], venv_script: str | None = None) -> str:
    """``[. venv &&] cd <cwd> && export ... && exec <cmd>`` as one string for a remote shell."""
    parts = [f". {shlex.quote(venv_script)}"] if venv_script else []
    parts.append(f"cd {shlex.quote(cwd)}")
    merged = {**exports, **extra}
    if merged:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in merged.items()))
    parts.append("exec " + shlex.join(cmd))
    return " && ".join(parts)


# -- 4. commands per launcher ------------------------------------------------------------------


def _world(active: Resources, pool: Mapping[str, int], master_addr: str, master_port: int,
           visible_env: str | None) -> dict:
    return {
        "hosts": [[host, slots, pool.get(host, len(slots))] for host, slots in active.items()],
        "master_addr": master_addr,
        "master_port": master_port,
        "visible_env": visible_env,
    }


def ssh_commands(world: Mapping, program: Sequence[str], *, python: str, cwd: str,
                 exports: Mapping[str, str], launcher_args: Sequence[str] = (),
                 venv_script: str | None = None) -> list[list[str]]:
    """One ``ssh <host> "<cd && export && torchrun>"`` per node, each with its own node rank."""
    commands = []
    for rank, (host, _slots, _total) in enumerate(world["hosts"]):
        cmd, extra = node_command(world, rank, program, python)
        commands.append(["ssh", *launcher_args, "--", host, _remote_shell(cwd, exports, extra, cmd, venv_script)])
    return commands


def pdsh_command(world: Mapping, program: Sequence[str], *, python: str, cwd: str,
                 exports: Mapping[str, str], launcher_args: Sequence[str] = (),
                 venv_script: str | None = None) -> list[str]:
    """One pdsh call; ``%h`` lets each node pick its own rank and slots in ``ds_core.cli.node``."""
    hosts = ",".join(entry[0] for entry in world["hosts"])
    node = [python, "-m", "ds_core.cli.node", "--host", "%h", "--world-info", encode_world(world),
            "--", *program]
    return ["pdsh", "-S", "-f", "1024", *launcher_args, "-w", hosts,
            _remote_shell(cwd, exports, {}, node, venv_script)]


def slurm_command(program: Sequence[str], *, python: str, nnodes: int, nproc: int,
                  master_addr: str, master_port: int, nodelist: Sequence[str] = (),
                  rdzv_id: str | None = None, launcher_args: Sequence[str] = ()) -> list[str]:
    """``srun`` with one task per node, each running torchrun against a c10d rendezvous."""
    cmd = ["srun", "--nodes", str(nnodes), "--ntasks-per-node", "1"]
    if nodelist:
        cmd += ["--nodelist", ",".join(nodelist)]
    cmd += list(launcher_args)
    return cmd + torchrun_command(python, program, nproc=nproc, nnodes=nnodes,
                                  master_addr=master_addr, master_port=master_port,
                                  rdzv_backend="c10d", rdzv_id=rdzv_id or f"ds-{uuid.uuid4().hex[:8]}")


def _default_launcher() -> str:
    return "pdsh" if shutil.which("pdsh") else "ssh"


def _slurm_first_node(environ: Mapping[str, str]) -> str | None:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist or not shutil.which("scontrol"):
        return None
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    names = out.stdout.split()
    return names[0] if out.returncode == 0 and names else None


def _not_applicable(args: argparse.Namespace, launcher: str) -> list[str]:
    """Notes on flags that have no effect with this launcher (printed, not fatal)."""
    notes = []
    remote = launcher in ("ssh", "pdsh")
    if args.ssh_port is not None and not remote:
        notes.append(f"--ssh_port has no effect on a {launcher} launch (no ssh is used)")
    if args.venv_script and not remote:
        notes.append(f"--venv_script has no effect on a {launcher} launch (nodes inherit this environment)")
    if args.no_ssh_check and not remote:
        notes.append(f"--no_ssh_check has no effect on a {launcher} launch (there is no ssh check)")
    return notes


# torch warns at import when numpy is missing, once per process (torchrun and every rank): nothing here
# needs numpy, so the first lines a user reads are not three copies of that.
QUIET_WARNINGS = ("ignore:Failed to initialize NumPy",)


def _log_env(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """LOGLEVEL for torchrun, and PYTHONWARNINGS extended with :data:`QUIET_WARNINGS`."""
    level = "error" if args.quiet else args.log_level
    out = {"LOGLEVEL": level.upper()} if level else {}
    current = (environ if environ is not None else os.environ).get("PYTHONWARNINGS", "")
    filters = [f for f in current.split(",") if f] + [f for f in QUIET_WARNINGS if f not in current]
    out["PYTHONWARNINGS"] = ",".join(filters)
    return out


def build_plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
               cwd: str | None = None, home: str | None = None) -> LaunchPlan:
    """Check every input and decide the commands; starts nothing."""
    environ = dict(os.environ if environ is None else environ)
    cwd = os.path.abspath(cwd or os.getcwd())
    home = home or os.path.expanduser("~")
    python = sys.executable
    program = program_args(args, time.strftime("%Y%m%d%H%M%S"))
    launcher_args = shlex.split(args.launcher_args or "")
    active, pool, source = resolve_resources(args)

    if args.launcher == "slurm":
        for flag, value in (("--ssh_port", args.ssh_port), ("--venv_script", args.venv_script),
                            ("--no_ssh", args.no_ssh)):
            if value:
                raise LaunchError(f"{flag} does not apply to --launcher slurm: srun reaches the nodes and passes "
                                  f"this environment on; drop {flag}")
        plan = _slurm_plan(args, active, environ, cwd, home, python, program, launcher_args)
        plan.extra_env.update(_log_env(args, environ))
        return plan

    if args.no_ssh:
        return _no_ssh_plan(args, active, pool, source, environ, python, program)

    if len(active) == 1 and not args.force_multi:
        ((_host, slots),) = active.items()
        visible_env = _visible_env() if not _is_prefix(slots) else None
        extra = visible_devices(slots, visible_env, environ.get(visible_env or ""))
        cmd = torchrun_command(python, program, nproc=len(slots), master_addr=args.master_addr,
                               master_port=args.master_port)
        return LaunchPlan("local", [cmd], {**extra, **_log_env(args, environ)}, active,
                          _not_applicable(args, "single-node"))

    launcher = args.launcher or _default_launcher()
    pool = pool or {host: len(slots) for host, slots in active.items()}  # --force_multi, no hostfile
    master_addr = args.master_addr or next(iter(active))
    master_port = args.master_port or DEFAULT_MASTER_PORT
    needs_mask = not all(_is_prefix(slots) for slots in active.values())
    world = _world(active, pool, master_addr, master_port, _visible_env() if needs_mask else None)
    exports = {**exported_env(environ, [home, cwd]), **_log_env(args, environ)}
    extra: dict[str, str] = {}
    if launcher == "ssh":
        ssh_args = [*launcher_args, *(["-p", str(args.ssh_port)] if args.ssh_port else [])]
        commands = ssh_commands(world, program, python=python, cwd=cwd, exports=exports,
                                launcher_args=ssh_args, venv_script=args.venv_script)
    else:
        if "PDSH_RCMD_TYPE" not in environ:
            extra["PDSH_RCMD_TYPE"] = "ssh"
        if args.ssh_port:
            append = environ.get("PDSH_SSH_ARGS_APPEND", "")
            extra["PDSH_SSH_ARGS_APPEND"] = f"{append} -p {args.ssh_port}".strip()
        commands = [pdsh_command(world, program, python=python, cwd=cwd, exports=exports,
                                 launcher_args=launcher_args, venv_script=args.venv_script)]
    plan = LaunchPlan(launcher, commands, extra, active)
    if not args.no_ssh_check:
        plan.ssh_check = ssh_check_commands(list(active), args.ssh_port)
    return plan


def _no_ssh_plan(args, active, pool, source, environ, python, program) -> LaunchPlan:
    """This node's part of a multi-node job whose nodes are each started by hand (``--no_ssh``)."""
    if pool is not None:  # a hostfile: the node count, this node's slots and the master come from it
        hosts = list(active)
        if args.node_rank >= len(hosts):
            raise LaunchError(f"--node_rank {args.node_rank}: {source} has {len(hosts)} active host(s) "
                              f"({', '.join(hosts)}), so node ranks run 0..{len(hosts) - 1}")
        slots = active[hosts[args.node_rank]]
        nnodes, master_addr = len(hosts), args.master_addr or hosts[0]
    else:
        if args.num_nodes is None or args.master_addr is None:
            raise LaunchError("--no_ssh without a hostfile needs --num_nodes N and --master_addr (the address of "
                              "node rank 0), the same on every node")
        if args.node_rank >= args.num_nodes:
            raise LaunchError(f"--node_rank {args.node_rank}: --num_nodes {args.num_nodes} gives node ranks "
                              f"0..{args.num_nodes - 1}")
        slots = next(iter(active.values()))
        nnodes, master_addr = args.num_nodes, args.master_addr
    visible_env = _visible_env() if not _is_prefix(slots) else None
    extra = visible_devices(slots, visible_env, environ.get(visible_env or ""))
    cmd = torchrun_command(python, program, nproc=len(slots), nnodes=nnodes, node_rank=args.node_rank,
                           master_addr=master_addr, master_port=args.master_port or DEFAULT_MASTER_PORT)
    return LaunchPlan("local", [cmd], {**extra, **_log_env(args, environ)}, {hosts[args.node_rank] if pool else
                                                                     "localhost": slots},
                      _not_applicable(args, "--no_ssh"))


def ssh_check_commands(hosts: Sequence[str], port: int | None) -> list[list[str]]:
    """``ssh -o BatchMode=yes ... <host> true`` for every host: passwordless ssh must work everywhere."""
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *(["-p", str(port)] if port else [])]
    return [["ssh", *options, "--", host, "true"] for host in hosts]


def check_ssh(commands: Sequence[Sequence[str]], timeout: float = 30.0) -> None:
    """Run the ssh checks side by side; raise one :class:`LaunchError` naming every host that failed."""
    procs = []
    for cmd in commands:
        try:
            procs.append((cmd, subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True)))
        except OSError as exc:
            raise LaunchError(f"cannot run ssh to check the hosts: {exc.strerror or exc}; install an ssh client "
                              f"or pass --no_ssh_check") from exc
    failed = []
    deadline = time.monotonic() + timeout
    for cmd, proc in procs:
        host = cmd[cmd.index("--") + 1]
        try:
            _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failed.append(f"{host} (no answer within {timeout:.0f} s)")
            continue
        if proc.returncode != 0:
            last = (err or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            failed.append(f"{host} ({last[0]})")
    if failed:
        raise LaunchError(f"cannot reach {', '.join(failed)} over ssh without a password: set up passwordless ssh "
                          f"to every host (ssh-copy-id), fix the names in the hostfile, or pass --no_ssh_check "
                          f"to skip this check")


def _slurm_plan(args, active, environ, cwd, home, python, program, launcher_args):
    # srun passes our environment on to the tasks (--export=ALL), so the env files go there.
    env = exported_env({}, [home, cwd])
    if active:  # from a hostfile
        counts = {len(slots) for slots in active.values()}
        layouts = {tuple(slots) for slots in active.values()}
        if len(counts) > 1 or len(layouts) > 1:
            detail = ", ".join(f"{h}:{','.join(map(str, s))}" for h, s in active.items())
            raise LaunchError(
                f"--launcher slurm starts the same command on every node, but the slots differ "
                f"between hosts ({detail}); make them uniform (--num_gpus, --include) or use "
                f"--launcher ssh/pdsh"
            )
        slots = next(iter(active.values()))
        nodelist = list(active)
        nproc = len(slots)
        visible = visible_devices(slots, _visible_env() if not _is_prefix(slots) else None)
        if visible:
            env.update(visible)
        master_addr = args.master_addr or nodelist[0]
    else:
        if args.nproc is None:
            raise LaunchError(
                "--launcher slurm without a hostfile needs --nproc (processes per node): the node "
                "that launches may not have the devices the job's nodes have"
            )
        nodelist, nproc = [], args.nproc
        master_addr = args.master_addr or _slurm_first_node(environ)
        if master_addr is None:
            raise LaunchError(
                "--launcher slurm: no --master_addr and no SLURM allocation to take the first node "
                "from (SLURM_JOB_NODELIST unset or scontrol missing); pass --master_addr or a "
                "hostfile"
            )
    nnodes = len(nodelist) or args.num_nodes or int(environ.get("SLURM_JOB_NUM_NODES", "1"))
    cmd = slurm_command(program, python=python, nnodes=nnodes, nproc=nproc,
                        master_addr=master_addr, master_port=args.master_port or DEFAULT_MASTER_PORT,
                        nodelist=nodelist, launcher_args=launcher_args,
                        rdzv_id=environ.get("SLURM_JOB_ID") and f"ds-{environ['SLURM_JOB_ID']}")
    return LaunchPlan("slurm", [cmd], env, active)


# -- 5. running --------------------------------------------------------------------------------


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _signal_groups(procs: Sequence[subprocess.Popen], signum: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass


def run_processes(commands: Sequence[Sequence[str]], env: Mapping[str, str] | None = None,
                  poll_s: float = 0.1, pid_file: str | None = None) -> int:
    """Run ``commands`` concurrently; when one fails stop the others; return the first failure.

    Each command gets its own process group so stopping it also stops what it started (a remote
    shell's children, a local torchrun's workers). SIGINT/SIGTERM sent to ``ds run`` are passed on.
    ``pid_file``: written with the started processes' pids (one a line) and removed at the end.
    """
    procs: list[subprocess.Popen] = []
    stop_at: float | None = None
    caught: list[int] = []

    def forward(signum, _frame):
        nonlocal stop_at
        caught.append(signum)
        stop_at = stop_at or time.monotonic() + STOP_GRACE_S
        _signal_groups(procs, signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first_failure: int | None = None
    try:
        for cmd in commands:
            try:
                procs.append(subprocess.Popen(list(cmd), env=dict(env) if env is not None else None,
                                              start_new_session=True))
            except OSError as exc:
                raise LaunchError(
                    f"cannot start {cmd[0]!r}: {exc.strerror or exc}; install it or put it on PATH "
                    f"(or pick another --launcher)"
                ) from exc
        if pid_file is not None:
            with open(pid_file, "w") as f:
                f.write("".join(f"{proc.pid}\n" for proc in procs))
        while True:
            running = False
            for proc in procs:
                code = proc.poll()
                if code is None:
                    running = True
                elif code != 0 and first_failure is None and not caught:
                    first_failure = _exit_code(code)
                    if len(procs) > 1:
                        print(f"ds run: command {procs.index(proc)} exited with {first_failure}; "
                              f"stopping the others", file=sys.stderr)
                    stop_at = time.monotonic() + STOP_GRACE_S
                    _signal_groups(procs, signal.SIGTERM)
            if not running:
                break
            if stop_at is not None and time.monotonic() > stop_at:
                _signal_groups(procs, signal.SIGKILL)
            time.sleep(poll_s)
    finally:
        _signal_groups(procs, signal.SIGKILL)  # nothing outlives the launcher
        for s, h in handlers.items():
            signal.signal(s, h)
        if pid_file is not None:
            try:
                os.unlink(pid_file)
            except FileNotFoundError:
                pass
    if first_failure is not None:
        return first_failure
    if caught:
        return 128 + caught[0]
    return 0


PID_DIR = "/tmp"  # DeepSpeed's place for --save_pid files


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    if args.dry_run:
        print("\n".join(plan.describe()))
        return 0
    where = "this machine" if plan.launcher == "local" else f"{len(plan.resources) or 'the'} nodes over {plan.launcher}"
    ranks = sum(len(slots) for slots in plan.resources.values())
    print(f"ds run: starting {ranks or 'the'} processes on {where} through torchrun (--dry-run prints the "
          f"commands)", file=sys.stderr, flush=True)
    for note in plan.notes:
        print(f"ds run: note: {note}", file=sys.stderr)
    if plan.ssh_check:
        check_ssh(plan.ssh_check)
    if args.enable_each_rank_log:
        try:
            os.makedirs(args.enable_each_rank_log, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"--enable_each_rank_log {args.enable_each_rank_log!r}: cannot create the directory "
                              f"({exc.strerror or exc})") from exc
    pid_file = os.path.join(PID_DIR, f"{os.getpid()}.deepspeed") if args.save_pid else None
    return run_processes(plan.commands, {**os.environ, **plan.extra_env}, pid_file=pid_file)
