"""``ds run``: start a training script on one node or many, through torchrun on every node.

The launch is a pipeline of small steps, each testable alone:

1. :func:`parse_args` — DeepSpeed-compatible flags (``--num_gpus``, ``--hostfile``, ``--include``...).
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

from ..errors import LaunchError
from .hostfile import DEFAULT_HOSTFILE, Resources, filter_resources, read_hostfile
from .node import DEFAULT_MASTER_PORT, encode_world, node_command, torchrun_command, visible_devices

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

    def describe(self) -> list[str]:
        """The commands as shell lines (what ``--dry-run`` prints)."""
        prefix = ["env", *(f"{k}={v}" for k, v in self.extra_env.items())] if self.extra_env else []
        return [shlex.join([*prefix, *cmd]) for cmd in self.commands]


# -- 1. arguments ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds run",
        description="Launch a training script with torchrun on this node, or on every node of a "
                    "DeepSpeed hostfile over ssh, pdsh or SLURM.",
        epilog="example: ds run --nproc 2 examples/train_gpt.py --config examples/configs/gpt_cpu.json",
    )
    a = p.add_argument
    a("--nproc", "--num_gpus", "--num-gpus", "--nproc_per_node", "--nproc-per-node", dest="nproc",
      type=int, default=None, metavar="N",
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
    a("--module", "-m", action="store_true", help="run the script as a module (python -m)")
    a("--no_python", "--no-python", dest="no_python", action="store_true",
      help="run the script as an executable, without python")
    a("--dry-run", "--dry_run", "--print-cmd", "--print_cmd", dest="dry_run", action="store_true",
      help="print the commands that would run, start nothing")
    a("script", help="training script (or module with --module, executable with --no_python)")
    a("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = _parser().parse_args(list(argv))
    if args.module and args.no_python:
        raise LaunchError("--module and --no_python were both given: a module needs python; keep "
                          "one of them")
    for flag, value in (("--nproc/--num_gpus", args.nproc), ("--num_nodes", args.num_nodes)):
        if value is not None and value < 1:
            raise LaunchError(f"{flag} {value}: must be a positive integer")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise LaunchError(f"--master_port {args.master_port}: must be a TCP port in 1..65535")
    return args


def program_args(args: argparse.Namespace) -> list[str]:
    """torchrun's trailing part: mode flags, the script and its arguments."""
    mode = ["--module"] if args.module else ["--no-python"] if args.no_python else []
    return [*mode, args.script, *args.script_args]


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
    if args.num_nodes is not None and args.num_nodes > 1:
        raise LaunchError(
            f"--num_nodes {args.num_nodes} needs a hostfile (none given and {DEFAULT_HOSTFILE} does "
            f"not exist); pass --hostfile with lines 'host slots=N', or use --launcher slurm"
        )
    # This machine only: as many slots as devices, or as --nproc asks (cpu ranks share one device).
    # Counting devices imports torch (seconds), so only when the slots depend on it.
    need_count = args.nproc is None or args.include or args.exclude
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
                  cmd: Sequence[str]) -> str:
    """``cd <cwd> && export ... && exec <cmd>`` as one string for a remote shell."""
    parts = [f"cd {shlex.quote(cwd)}"]
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
                 exports: Mapping[str, str], launcher_args: Sequence[str] = ()) -> list[list[str]]:
    """One ``ssh <host> "<cd && export && torchrun>"`` per node, each with its own node rank."""
    commands = []
    for rank, (host, _slots, _total) in enumerate(world["hosts"]):
        cmd, extra = node_command(world, rank, program, python)
        commands.append(["ssh", *launcher_args, host, _remote_shell(cwd, exports, extra, cmd)])
    return commands


def pdsh_command(world: Mapping, program: Sequence[str], *, python: str, cwd: str,
                 exports: Mapping[str, str], launcher_args: Sequence[str] = ()) -> list[str]:
    """One pdsh call; ``%h`` lets each node pick its own rank and slots in ``ds_core.cli.node``."""
    hosts = ",".join(entry[0] for entry in world["hosts"])
    node = [python, "-m", "ds_core.cli.node", "--host", "%h", "--world-info", encode_world(world),
            "--", *program]
    return ["pdsh", "-S", "-f", "1024", *launcher_args, "-w", hosts,
            _remote_shell(cwd, exports, {}, node)]


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


def build_plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
               cwd: str | None = None, home: str | None = None) -> LaunchPlan:
    """Check every input and decide the commands; starts nothing."""
    environ = dict(os.environ if environ is None else environ)
    cwd = os.path.abspath(cwd or os.getcwd())
    home = home or os.path.expanduser("~")
    python = sys.executable
    program = program_args(args)
    launcher_args = shlex.split(args.launcher_args or "")
    active, pool, _source = resolve_resources(args)

    if args.launcher == "slurm":
        return _slurm_plan(args, active, environ, cwd, home, python, program, launcher_args)

    if len(active) == 1 and not args.force_multi:
        ((_host, slots),) = active.items()
        visible_env = _visible_env() if not _is_prefix(slots) else None
        extra = visible_devices(slots, visible_env, environ.get(visible_env or ""))
        cmd = torchrun_command(python, program, nproc=len(slots), master_addr=args.master_addr,
                               master_port=args.master_port)
        return LaunchPlan("local", [cmd], extra, active)

    launcher = args.launcher or _default_launcher()
    pool = pool or {host: len(slots) for host, slots in active.items()}  # --force_multi, no hostfile
    master_addr = args.master_addr or next(iter(active))
    master_port = args.master_port or DEFAULT_MASTER_PORT
    needs_mask = not all(_is_prefix(slots) for slots in active.values())
    world = _world(active, pool, master_addr, master_port, _visible_env() if needs_mask else None)
    exports = exported_env(environ, [home, cwd])
    extra: dict[str, str] = {}
    if launcher == "ssh":
        commands = ssh_commands(world, program, python=python, cwd=cwd, exports=exports,
                                launcher_args=launcher_args)
    else:
        if "PDSH_RCMD_TYPE" not in environ:
            extra["PDSH_RCMD_TYPE"] = "ssh"
        commands = [pdsh_command(world, program, python=python, cwd=cwd, exports=exports,
                                 launcher_args=launcher_args)]
    return LaunchPlan(launcher, commands, extra, active)


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
                  poll_s: float = 0.1) -> int:
    """Run ``commands`` concurrently; when one fails stop the others; return the first failure.

    Each command gets its own process group so stopping it also stops what it started (a remote
    shell's children, a local torchrun's workers). SIGINT/SIGTERM sent to ``ds run`` are passed on.
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
    if first_failure is not None:
        return first_failure
    if caught:
        return 128 + caught[0]
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    if args.dry_run:
        print("\n".join(plan.describe()))
        return 0
    return run_processes(plan.commands, {**os.environ, **plan.extra_env})
