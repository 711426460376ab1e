"""The ``ds`` command: built-in subcommands plus any a package registers under ``ds.cli``.

A ``ds.cli`` entry point names a ``main(argv: list[str]) -> int`` function; it is imported only when
its subcommand runs, so ``ds --help`` lists every subcommand without importing any of them.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

BUILTIN = {
    "report": ("ds_core.cli.report:main", "versions, accelerator, installed features and ops"),
    "run": ("ds_core.cli.run:main", "launch a training script on one or many nodes"),
    "convert-deepspeed": ("ds_core.convert.cli:main", "convert a DeepSpeed checkpoint into a ds checkpoint"),
}


def _usage(extra) -> str:
    lines = ["usage: ds <command> [args...]", "", "commands:"]
    for name, (_, about) in BUILTIN.items():
        lines.append(f"  {name:<16}{about}")
    for ref in extra:
        lines.append(f"  {ref.name:<16}(from {ref.dist})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .. import plugins
    from ..errors import DSError, closest

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = [ref for ref in plugins.entries("ds.cli") if ref.name not in BUILTIN]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(extra))
        return 0
    command, rest = argv[0], argv[1:]
    if command in BUILTIN:
        target = BUILTIN[command][0]
        entry = plugins.load_qualified(target)
    else:
        by_name = {ref.name: ref for ref in extra}
        if command not in by_name:
            names = list(BUILTIN) + list(by_name)
            print(f"ds: unknown command {command!r}{closest(command, names)}; commands: "
                  f"{', '.join(names)}", file=sys.stderr)
            return 2
        entry = by_name[command].load()
    try:
        return int(entry(rest) or 0)
    except DSError as exc:
        print(f"ds {command}: error: {exc}", file=sys.stderr)
        return 2
