"""``ds ops``: prebuild the C++ kernels into the cache, or list ops and kernels.

``ds ops build`` compiles every C++ extension now (e.g. once per node before launching ranks, or in
a container image) so the first training step does not wait for the compiler; ``ds ops list``
prints what ``ds report`` prints for ds_ops, without compiling anything.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _build(names: list[str], verbose: bool) -> int:
    from . import build

    unknown = [n for n in names if n not in build.EXTENSIONS]
    if unknown:
        print(f"ds ops build: unknown extension(s) {', '.join(unknown)}; known: "
              f"{', '.join(build.EXTENSIONS)}", file=sys.stderr)
        return 2
    names = names or list(build.EXTENSIONS)
    failed = 0
    print(f"cache: {build.cache_root()} (set {build.CACHE_ENV} to change)")
    for name in names:
        start = time.perf_counter()
        try:
            module = build.load(name, verbose=verbose)
        except build.BuildError as exc:
            failed += 1
            print(f"  {name:<12} FAILED: {exc}", file=sys.stderr)
            continue
        print(f"  {name:<12} ok in {time.perf_counter() - start:.1f}s  ({module.__file__})")
    return 1 if failed else 0


def _list() -> int:
    from .registry import register

    for row in register().report_rows():
        print("  ".join(f"{c:<18}" for c in row))
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import build

    parser = argparse.ArgumentParser(prog="ds ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="compile the C++ kernels into the cache now")
    p_build.add_argument("names", nargs="*", metavar="NAME",
                         help=f"extensions to build (default: all of {', '.join(build.EXTENSIONS)})")
    p_build.add_argument("--verbose", action="store_true", help="show the compiler output")
    sub.add_parser("list", help="ops, their kernels per device and whether each can build here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "build":
        return _build(args.names, args.verbose)
    return _list()
