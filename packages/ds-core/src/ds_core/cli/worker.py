"""Per-rank set-up that torchrun cannot do, applied just before the training script starts.

``ds run`` puts this module between torchrun and the script only when a DeepSpeed launcher flag asks
for it (``--bind_cores_to_rank``, ``--enable_each_rank_log``, ``--local_rank_arg``)::

    torchrun ... --module -- ds_core.cli.worker [options] -- train.py --lr 0.1

It reads the rank torchrun gave it (``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), binds the process
to its share of the cores and sets ``OMP_NUM_THREADS`` to that share, sends stdout and stderr to the
rank's log file, and then *replaces itself* (``exec``) with the script: the affinity, the environment
and the redirected descriptors carry over, and signals and the exit code are the script's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import LaunchError

__all__ = ["parse_core_list", "cores_for_rank", "command", "main"]


def parse_core_list(text: str, flag: str = "--bind_core_list") -> list[int]:
    """``0,2-5,8`` -> ``[0, 2, 3, 4, 5, 8]`` (order kept, duplicates refused)."""
    cores: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise LaunchError(f"{flag} {text!r}: {part!r} is not a core number or a range 'a-b' with a <= b; "
                              f"write e.g. 0-7,16-23")
        for core in range(int(lo), int(hi if dash else lo) + 1):
            if core in cores:
                raise LaunchError(f"{flag} {text!r} lists core {core} twice; list each core once")
            cores.append(core)
    return cores


def cores_for_rank(cores: Sequence[int], local_rank: int, local_world: int) -> list[int]:
    """Local rank ``local_rank``'s equal share of ``cores`` (the remainder is left unused)."""
    per = len(cores) // local_world
    if per < 1:
        raise LaunchError(f"--bind_cores_to_rank: {len(cores)} core(s) ({', '.join(map(str, cores))}) for "
                          f"{local_world} ranks on this node; each rank needs at least one: start fewer ranks "
                          f"or list more cores with --bind_core_list")
    return list(cores[local_rank * per:(local_rank + 1) * per])


def command(mode: str, script: str, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """The argv that runs the script as torchrun would have run it."""
    if mode == "exec":
        return [script, *args]
    if mode == "module":
        return [python, "-u", "-m", script, *args]
    return [python, "-u", script, *args]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_core.cli.worker", allow_abbrev=False,
                                description="Per-rank set-up between torchrun and the script (started by ds run).")
    p.add_argument("--mode", choices=("python", "module", "exec"), default="python")
    p.add_argument("--bind-cores", default=None, metavar="all|LIST",
                   help="bind to this rank's share of the cores: 'all' (those this process may use) or a list")
    p.add_argument("--rank-log", default=None, metavar="DIR/PREFIX",
                   help="send stdout and stderr to DIR/PREFIX_rank<RANK>.log")
    p.add_argument("--local-rank-arg", action="store_true", help="put --local_rank=<LOCAL_RANK> before the args")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- script [args...]")
    return p


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise LaunchError(f"{name} is not set: ds_core.cli.worker runs under torchrun (through ds run)")
        return default
    return int(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise LaunchError("no script after the options; pass '-- script [args...]'")
    script, script_args = program[0], program[1:]
    local_rank = _env_int("LOCAL_RANK")
    if args.local_rank_arg:
        script_args = [f"--local_rank={local_rank}", *script_args]
    if args.bind_cores is not None:
        pool = sorted(os.sched_getaffinity(0)) if args.bind_cores == "all" else parse_core_list(args.bind_cores)
        mine = cores_for_rank(pool, local_rank, _env_int("LOCAL_WORLD_SIZE", 1))
        os.sched_setaffinity(0, mine)
        os.environ["OMP_NUM_THREADS"] = str(len(mine))
    if args.rank_log is not None:
        path = f"{args.rank_log}_rank{_env_int('RANK', local_rank)}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    cmd = command(args.mode, script, script_args)
    try:
        if args.mode == "exec":
            os.execvp(cmd[0], cmd)
        os.execv(cmd[0], cmd)
    except OSError as exc:
        raise LaunchError(f"cannot start {cmd[0]!r}: {exc.strerror or exc}") from exc
    return 0  # not reached


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LaunchError as exc:
        print(f"ds worker: error: {exc}", file=sys.stderr)
        sys.exit(2)
