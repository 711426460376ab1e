"""DeepSpeed hostfiles and the ``--include/--exclude/--num_nodes/--num_gpus`` filters.

A hostfile lists one node per line as ``hostname slots=N`` (``#`` comments and blank lines are
allowed); the order of the lines is the order of the node ranks. Filtering turns that pool into the
*active resources* of a launch: an ordered ``{host: [slot indices]}``. Everything here is pure
parsing and set arithmetic, so every rule is checked before ``ds run`` starts a single process.

Filter syntax (DeepSpeed's): ``host1@host2:0,2@host3`` — ``@`` separates hosts, a host alone means
all its slots, ``host:i,j`` means those slot indices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ..errors import LaunchError, closest

__all__ = [
    "DEFAULT_HOSTFILE",
    "parse_hostfile",
    "read_hostfile",
    "parse_filter",
    "filter_resources",
    "Resources",
    "check_host",
    "MAX_SLOTS",
]

DEFAULT_HOSTFILE = "/job/hostfile"

# host -> slot indices on that host, in node-rank order.
Resources = dict[str, list[int]]

_LINE = re.compile(r"^(?P<host>[^\s#=]+)\s+slots=(?P<slots>\S+)$")
_HOSTFILE_RULE = "each line must be 'hostname slots=N' with N a positive integer"
MAX_SLOTS = 4096  # processes per host; far above any machine, low enough to plan for
# A DNS name or an IPv4 address: labels of letters, digits, '-' and '_', joined by '.'; nothing a shell
# or ssh would read as syntax or an option (a leading '-').
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*$")


def check_host(host: str, where: str) -> str:
    """Raise naming ``where`` when ``host`` is not a valid host name or IPv4 address."""
    if not _HOST.match(host):
        raise LaunchError(
            f"{where}: {host!r} is not a host name: use letters, digits, '-' and '_' in labels joined by "
            f"'.', not starting with '-' (e.g. worker-1 or 10.0.0.7)"
        )
    return host


def parse_hostfile(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse hostfile text into ``{host: slots}`` in file order.

    ``source`` names the file in error messages.
    """
    pool: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}: {raw.strip()!r}"
        match = _LINE.match(line)
        if match is None:
            raise LaunchError(
                f"{where} is not a hostfile line: {_HOSTFILE_RULE}; "
                f"write it as e.g. 'worker-1 slots=8' or comment it out with '#'"
            )
        host, slots_text = match["host"], match["slots"]
        check_host(host, where)
        slots = int(slots_text) if slots_text.isascii() and slots_text.isdigit() and len(slots_text) < 10 else 0
        if slots < 1 or slots > MAX_SLOTS:
            raise LaunchError(
                f"{where} has slots={slots_text}: {_HOSTFILE_RULE} of at most {MAX_SLOTS}; "
                f"set slots to the number of processes (devices) to start on {host}"
            )
        if host in pool:
            raise LaunchError(
                f"{where} lists host {host!r} again (first at line {first_seen[host]}): each host "
                f"may appear once; merge the two lines into one with the total slots"
            )
        pool[host] = slots
        first_seen[host] = number
    if not pool:
        raise LaunchError(
            f"{source} lists no hosts ({_HOSTFILE_RULE}); add a line per node, or drop --hostfile "
            f"to launch on this machine only"
        )
    return pool


def read_hostfile(path: str) -> dict[str, int]:
    """Read and parse the hostfile at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LaunchError(
            f"cannot read hostfile {path!r}: {exc.strerror or exc}; pass --hostfile with an existing "
            f"file"
        ) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise LaunchError(
            f"{os.fspath(path)}:{line}: byte {data[exc.start:exc.start + 1]!r} is not UTF-8 text; a hostfile "
            f"holds plain 'hostname slots=N' lines: save it as UTF-8 (or ASCII)"
        ) from None
    return parse_hostfile(text, source=os.fspath(path))


def parse_filter(spec: str, flag: str) -> dict[str, list[int] | None]:
    """Parse ``host1@host2:0,2`` into ``{host: None (all slots) or [indices]}``.

    ``flag`` (``--include`` or ``--exclude``) names the option in error messages. A host given
    twice merges its slot lists.
    """
    rule = "'host' (all its slots) or 'host:i,j' (those slot indices), joined with '@'"
    result: dict[str, list[int] | None] = {}
    if not spec.strip():
        raise LaunchError(f"{flag} is empty: it takes {rule}, e.g. {flag} worker-1@worker-2:0,1")
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise LaunchError(
                f"{flag} {spec!r} has an empty entry (two '@' in a row, or one at an end): it takes "
                f"{rule}; remove the extra '@'"
            )
        host, sep, slot_text = part.partition(":")
        if not host:
            raise LaunchError(f"{flag} {spec!r}: entry {part!r} has no host name before ':'; "
                              f"it takes {rule}")
        if not sep:
            result[host] = None
            continue
        slots: list[int] = []
        for item in slot_text.split(","):
            item = item.strip()
            if not item.isdigit():
                raise LaunchError(
                    f"{flag} {spec!r}: slot {item!r} of host {host!r} is not a non-negative "
                    f"integer; it takes {rule}, e.g. {host}:0,1"
                )
            slots.append(int(item))
        if host in result and result[host] is None:
            continue  # already all slots
        merged = set(result.get(host) or []) | set(slots)
        result[host] = sorted(merged)
    return result


def _check_against_pool(selection: Mapping[str, list[int] | None], pool: Mapping[str, int],
                        flag: str, source: str) -> None:
    for host, slots in selection.items():
        if host not in pool:
            raise LaunchError(
                f"{flag} names host {host!r}, which is not in {source}{closest(host, pool)}; "
                f"known hosts: {', '.join(pool)}; fix the name or add the host to {source}"
            )
        for index in slots or []:
            if index >= pool[host]:
                raise LaunchError(
                    f"{flag} asks for slot {index} on {host!r}, which has slots={pool[host]} in "
                    f"{source} (valid indices 0..{pool[host] - 1}); use an index in that range"
                )


def filter_resources(
    pool: Mapping[str, int],
    *,
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_slots: int | None = None,
    source: str = "the hostfile",
) -> Resources:
    """Turn ``{host: slots}`` into the active ``{host: [slot indices]}`` of one launch.

    Order of application: ``include`` or ``exclude``, then ``num_nodes`` (keep the first K hosts),
    then ``num_slots`` (keep at most the first G remaining slots of each host). Host order is the
    pool's order, whatever the order in the filter.
    """
    if include is not None and exclude is not None:
        raise LaunchError(
            f"--include {include!r} and --exclude {exclude!r} were both given: they cannot be "
            f"combined; keep one (list what to use with --include, or what to skip with --exclude)"
        )
    active: Resources = {host: list(range(slots)) for host, slots in pool.items()}
    if include is not None:
        selection = parse_filter(include, "--include")
        _check_against_pool(selection, pool, "--include", source)
        active = {host: (list(range(pool[host])) if selection[host] is None else selection[host])
                  for host in pool if host in selection}
    elif exclude is not None:
        selection = parse_filter(exclude, "--exclude")
        _check_against_pool(selection, pool, "--exclude", source)
        for host, slots in selection.items():
            if slots is None:
                active.pop(host)
            else:
                active[host] = [i for i in active[host] if i not in slots]
        active = {host: slots for host, slots in active.items() if slots}
    if not active:
        raise LaunchError(
            f"--exclude {exclude!r} removes every slot of {source}: nothing is left to launch on; "
            f"exclude less"
        )
    if num_nodes is not None:
        if num_nodes < 1:
            raise LaunchError(f"--num_nodes {num_nodes}: must be a positive integer; drop it to use "
                              f"every host")
        if num_nodes > len(active):
            raise LaunchError(
                f"--num_nodes {num_nodes} but only {len(active)} host(s) are available "
                f"({', '.join(active)}) in {source} after filtering; lower --num_nodes or add hosts"
            )
        active = dict(list(active.items())[:num_nodes])
    if num_slots is not None:
        if num_slots < 1:
            raise LaunchError(f"--num_gpus/--nproc {num_slots}: must be a positive integer; drop it "
                              f"to use every slot")
        active = {host: slots[:num_slots] for host, slots in active.items()}
    return active
