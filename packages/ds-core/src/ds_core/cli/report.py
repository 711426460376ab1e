"""``ds report``: what is installed and what this machine can use, without importing feature code."""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import sys

__all__ = ["main", "collect", "ds_on_path"]


def ds_on_path(path_env: str | None = None) -> dict:
    """Which program the shell runs for ``ds``: ours, another package's (DeepSpeed installs a ``ds``
    script too: whichever package is installed last owns the name), or none.

    Returns ``{"path", "owner", "note"}``; ``owner`` is ``"ds-core"``, ``"deepspeed"``, ``"other"``
    or ``None`` (no ``ds`` on PATH). ``note`` says what to do when it is not ours.
    """
    path = shutil.which("ds", path=path_env)
    if path is None:
        return {"path": None, "owner": None,
                "note": "no 'ds' on PATH (the environment's bin directory is not on PATH?): use "
                        "'python -m ds_core', which always works"}
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        head = ""
    if "ds_core" in head:
        shebang = head.splitlines()[0][2:].strip() if head.startswith("#!") else ""
        interpreter = shebang.split()[0] if shebang else ""
        # compare bin directories, not resolved files: every venv's python links to the same base interpreter
        same = not interpreter or os.path.dirname(os.path.abspath(interpreter)) == \
            os.path.dirname(os.path.abspath(sys.executable))
        note = "" if same else (f"{path} is ds-core's but runs {interpreter}, not this Python ({sys.executable}): "
                                f"another environment's ds; use 'python -m ds_core' for this one")
        return {"path": path, "owner": "ds-core", "note": note}
    owner = "deepspeed" if "deepspeed" in head else "other"
    what = "DeepSpeed's launcher (the deepspeed package installs a 'ds' script too)" if owner == "deepspeed" \
        else "not ds-core's"
    return {"path": path, "owner": owner,
            "note": f"the 'ds' on PATH ({path}) is {what}: run ds-core's commands as 'python -m ds_core ...' "
                    f"(e.g. python -m ds_core run ...), or reinstall ds-core after deepspeed to take the name back"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect(with_ops: bool = True) -> dict:
    from .. import plugins
    from ..accelerator import available_accelerators, get_accelerator
    from ..errors import DSError

    packages = {name: _version(name) for name in
                ("ds-core", "ds-zero", "ds-pipe", "ds-moe", "ds-infer", "ds-compress", "ds-ops")}
    try:
        acc = get_accelerator()
        chosen = {"name": acc.name, "device_type": acc.device_type,
                  "backend": acc.communication_backend(),
                  "capabilities": sorted(acc.capabilities)}
    except DSError as exc:
        chosen = {"error": str(exc)}
    feats = {
        name: {"package": spec.dist, "version": spec.version, "section": spec.config_section,
               "capabilities": list(spec.capabilities), "devices": list(spec.devices),
               "precisions": list(spec.precisions)}
        for name, spec in plugins.features().items()
    }
    ops_rows: list[list[str]] = []
    if with_ops:
        from ..ops import providers

        for provider_name, provider in providers().items():
            rows = getattr(provider, "report_rows", None)
            for row in (rows() if callable(rows) else []):
                ops_rows.append([provider_name, *map(str, row)])
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "packages": packages,
        "accelerator": chosen,
        "accelerators_available": available_accelerators(),
        "features": feats,
        "ops": ops_rows,
        "cli": [ref.name for ref in plugins.entries("ds.cli")],
        "ds_on_path": ds_on_path(),
        "plugin_failures": [list(f) for f in plugins.failures()],
    }


def _print(info: dict) -> None:
    print("ds report")
    print(f"  python {info['python']}  torch {info['torch']}  ({info['platform']})")
    print("\npackages")
    for name, ver in info["packages"].items():
        print(f"  {name:<14}{ver or 'not installed'}")
    acc = info["accelerator"]
    print("\naccelerator")
    if "error" in acc:
        print(f"  error: {acc['error']}")
    else:
        print(f"  chosen: {acc['name']} (device {acc['device_type']}, backend {acc['backend']}, "
              f"capabilities {', '.join(acc['capabilities'])})")
    avail = ", ".join(f"{n}={'yes' if ok else 'no'}" for n, ok in info["accelerators_available"].items())
    print(f"  installed: {avail}")
    print("\nfeatures")
    if not info["features"]:
        print("  none installed (pip install ds-zero ds-pipe ds-moe ...)")
    for name, f in info["features"].items():
        print(f"  {name:<10}{f['package']} {f['version']}  section={f['section']}  "
              f"devices={','.join(f['devices'])}  precisions={','.join(f['precisions'])}")
        if f["capabilities"]:
            print(f"  {'':<10}capabilities: {', '.join(f['capabilities'])}")
    print("\nops")
    if not info["ops"]:
        print("  no kernel package installed (pip install ds-ops); PyTorch defaults are used")
    rows = [row[1:] for row in info["ops"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    for row in rows:
        print("  " + "  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + "  " + row[-1])
    print(f"\nds subcommands from plugins: {', '.join(info['cli']) or 'none'}")
    on_path = info["ds_on_path"]
    print(f"'ds' on PATH: {on_path['path'] or 'none'}" + (f" ({on_path['owner']})" if on_path["owner"] else ""))
    if on_path["note"]:
        print(f"warning: {on_path['note']}")
    for group, name, reason in info["plugin_failures"]:
        print(f"plugin failure: {group} {name}: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds report", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--no-ops", action="store_true", help="skip loading kernel providers")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failures are listed in the report itself
        info = collect(with_ops=not args.no_ops)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print(info)
    return 0
