"""Check the import graph of the packages: no cycles, and no package importing a sibling.

    python tools/check_imports.py [--root packages]

Every ``import`` / ``from ... import`` in ``packages/*/src/<name>/**.py`` is an edge — at module level
or inside a function (a lazy import still ties the two modules together), except under
``if TYPE_CHECKING:``. Imports by string (``importlib.import_module``, entry points) are not edges: that
is how packages discover each other without depending on each other.

Rules (the architecture's, see DESIGN.md section 1):

- the graph of modules has no cycle (each is printed as ``a -> b -> ... -> a``);
- a package imports only itself and ``ds_core``; ``ds_infer`` may also import ``ds_parallel``.

Exit status 1 when a rule is broken, with every violation listed.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

#: package -> the sibling packages it may import besides ds_core
ALLOWED = {"ds_infer": {"ds_parallel"}}
CORE = "ds_core"


def find_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every package under ``root/*/src``."""
    modules = {}
    for src in sorted(root.glob("*/src")):
        for file in sorted(src.rglob("*.py")):
            parts = list(file.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = file
    return modules


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _closest(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def edges_of(name: str, file: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Internal modules ``name`` imports -> the line of the first such import."""
    is_package = file.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in _imports(ast.parse(file.read_text(), str(file))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            found = _closest(target, modules)
            if found is not None and found != name:
                out.setdefault(found, node.lineno)
    return out


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan, iterative enough for package-sized graphs
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_path_in(graph, set(c)) for c in components]


def _path_in(graph: dict[str, dict[str, int]], members: set[str]) -> list[str]:
    """A closed path through ``members`` starting at the smallest name (breadth-first back to it)."""
    start = min(members)
    previous = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, {})):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    return sorted(members)


def check(root: Path) -> list[str]:
    modules = find_modules(root)
    graph = {name: edges_of(name, file, modules) for name, file in modules.items()}
    problems = []
    for name, targets in sorted(graph.items()):
        top = name.split(".")[0]
        for target, line in sorted(targets.items()):
            other = target.split(".")[0]
            if other not in (top, CORE) and other not in ALLOWED.get(top, ()):
                problems.append(f"{modules[name]}:{line}: {name} imports {target}: package {top} may import only "
                                f"itself and {CORE}" + (f" (and {', '.join(sorted(ALLOWED[top]))})"
                                                        if top in ALLOWED else "")
                                + "; reach other packages through ds_core's seams (entry points, parameter tags)")
    for cycle in find_cycles(graph):
        first = cycle[0]
        problems.append(f"{modules[first]}:{graph[first][cycle[1]]}: import cycle " + " -> ".join(cycle) +
                        "; move what both need into a module neither imports, or merge them")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent / "packages"))
    args = parser.parse_args(argv)
    problems = check(Path(args.root))
    for problem in problems:
        print(problem)
    modules = len(find_modules(Path(args.root)))
    print(f"check_imports: {modules} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
