"""What one node runs: the torchrun command line for a node, and the runner pdsh starts everywhere.

``ds run`` builds per-node commands from a *world*: the active hosts in node-rank order with their
slot indices, the rendezvous address and the visible-devices variable of the accelerator. For ssh
the launcher resolves each node's command itself (:func:`node_command`); pdsh sends one identical
command to every node, so the node resolves its own part here::

    python -m ds_core.cli.node --host %h --world-info <base64 json> -- train.py --lr 0.1

pdsh replaces ``%h`` with the host name it connected to; this module finds that host in the world,
takes its node rank and slots, sets the visible-devices variable when only some slots are used, and
replaces itself (``exec``) with ``python -m torch.distributed.run``, so signals and the exit code
are torchrun's own.

Rendezvous is torchrun's *static* one (``--nnodes/--node_rank/--master_addr/--master_port``): node
ranks follow the hostfile, so global rank 0 lands on the first host, the master, as in DeepSpeed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence

from ..errors import LaunchError

DEFAULT_MASTER_PORT = 29500

__all__ = [
    "DEFAULT_MASTER_PORT",
    "torchrun_command",
    "visible_devices",
    "node_command",
    "encode_world",
    "decode_world",
    "find_host",
    "main",
]


def torchrun_command(
    python: str,
    program: Sequence[str],
    *,
    nproc: int | str,
    nnodes: int = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_backend: str | None = None,
    rdzv_id: str | None = None,
) -> list[str]:
    """``python -m torch.distributed.run ...`` for one node.

    With neither ``master_addr`` nor ``rdzv_backend`` the node runs ``--standalone`` (a local
    rendezvous on a free port). ``rdzv_backend="c10d"`` uses ``master_addr:master_port`` as the
    rendezvous endpoint and lets torchrun number the nodes; otherwise the static rendezvous takes
    ``node_rank`` from us.
    """
    cmd = [python, "-m", "torch.distributed.run"]
    if rdzv_backend is not None:
        cmd += ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
                "--rdzv_backend", rdzv_backend, "--rdzv_endpoint", f"{master_addr}:{master_port}"]
        if rdzv_id:
            cmd += ["--rdzv_id", rdzv_id]
    elif master_addr is None and master_port is None and nnodes == 1:
        cmd += ["--standalone", "--nproc_per_node", str(nproc)]
    else:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank or 0),
                "--nproc_per_node", str(nproc),
                "--master_addr", master_addr or "127.0.0.1",
                "--master_port", str(master_port or DEFAULT_MASTER_PORT)]
    return cmd + list(program)


def visible_devices(slots: Sequence[int], visible_env: str | None,
                    already_visible: str | None = None) -> dict[str, str]:
    """The variable that hides unused devices, or ``{}`` when none is needed.

    Nothing is set when the slots are ``0..n-1`` (local ranks already map to those devices) or the
    accelerator has no such variable (cpu: the slot count alone decides how many processes run).
    ``already_visible`` is the variable's current value on the node, when known: slot indices then
    count inside it, as the devices the process sees are numbered that way.
    """
    if visible_env is None or list(slots) == list(range(len(slots))):
        return {}
    if already_visible:
        ids = [item.strip() for item in already_visible.split(",") if item.strip()]
        if max(slots) >= len(ids):
            raise LaunchError(
                f"slot {max(slots)} was asked for but {visible_env}={already_visible!r} shows only "
                f"{len(ids)} device(s); unset {visible_env} or pick slots below {len(ids)}"
            )
        return {visible_env: ",".join(ids[i] for i in slots)}
    return {visible_env: ",".join(str(i) for i in slots)}


def encode_world(world: Mapping) -> str:
    """World description -> one shell-safe token (urlsafe base64 of compact JSON)."""
    raw = json.dumps(world, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_world(token: str) -> dict:
    try:
        world = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LaunchError(
            f"--world-info {token[:40]!r}... is not base64 JSON as written by 'ds run': {exc}; "
            f"start nodes through 'ds run', not by hand"
        ) from exc
    for key in ("hosts", "master_addr", "master_port"):
        if key not in world:
            raise LaunchError(f"--world-info lacks {key!r}; it must come from the same ds version "
                              f"as this node's")
    return world


def find_host(world: Mapping, host: str) -> int:
    """Node rank of ``host``; falls back to this machine's own names when ``host`` is unknown."""
    names = [entry[0] for entry in world["hosts"]]
    candidates = [host]
    if host not in names:  # e.g. a pdsh build that does not substitute %h
        fqdn = socket.getfqdn()
        candidates += [socket.gethostname(), fqdn, fqdn.split(".")[0]]
    for name in candidates:
        if name in names:
            return names.index(name)
    raise LaunchError(
        f"host {host!r} (this machine: {socket.gethostname()!r}) is not one of the launch's hosts "
        f"({', '.join(names)}); the hostfile must use the names pdsh connects to"
    )


def node_command(world: Mapping, node_rank: int, program: Sequence[str], python: str,
                 already_visible: str | None = None) -> tuple[list[str], dict[str, str]]:
    """torchrun argv and the extra environment for the node at ``node_rank`` of ``world``."""
    _, slots, _total = world["hosts"][node_rank]
    env = visible_devices(slots, world.get("visible_env"), already_visible)
    cmd = torchrun_command(
        python, program, nproc=len(slots), nnodes=len(world["hosts"]), node_rank=node_rank,
        master_addr=world["master_addr"], master_port=int(world["master_port"]),
    )
    return cmd, env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ds_core.cli.node",
        description="Per-node runner started by 'ds run --launcher pdsh': picks this node's rank "
                    "and slots from --world-info and execs torchrun.",
    )
    p.add_argument("--host", required=True, help="this node's name as in the hostfile (pdsh: %%h)")
    p.add_argument("--world-info", required=True, help="base64 JSON written by 'ds run'")
    p.add_argument("--print-cmd", action="store_true", help="print the torchrun command, run nothing")
    p.add_argument("program", nargs=argparse.REMAINDER, help="[--] script and its arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise LaunchError("no training script after the options; pass '-- script.py [args]'")
    world = decode_world(args.world_info)
    rank = find_host(world, args.host)
    visible_env = world.get("visible_env")
    cmd, extra = node_command(world, rank, program, sys.executable,
                              os.environ.get(visible_env) if visible_env else None)
    if args.print_cmd:
        print(" ".join(f"{k}={v}" for k, v in extra.items()), *cmd)
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **extra})
    return 0  # not reached


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LaunchError as exc:
        print(f"ds node: error: {exc}", file=sys.stderr)
        sys.exit(2)
