"""The package's layout: modules with line counts, and the import graph between them.

    python scripts/layout.py            # modules, lines, what each imports
    python scripts/layout.py --check    # exit 1 on an import circle or an experiment importing another

Imports are read from the source (``ast``), module-level and function-level alike, so a
circle closed by a lazy import inside a function is found too.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "diralign"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def graph() -> tuple[dict[str, set[str]], dict[str, int]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f): f for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lines = {m: len(f.read_text().splitlines()) for m, f in modules.items()}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base, *named = resolve(name, path.name == "__init__.py", node)
                # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package.
                targets = [t if t in modules else base for t in named]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                # The deepest module the import names (a name imported from a package is
                # the package unless it is a submodule).
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != PACKAGE:
                    edges[name].add(target)
    return edges, lines


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    prefix = f"{PACKAGE}.experiments."
    for source, targets in edges.items():
        for target in targets:
            if source.startswith(prefix) and target.startswith(prefix) and not target.endswith(".base"):
                found.append(f"{source} imports {target} (experiments must not import one another)")
            if source.startswith(f"{PACKAGE}.figures") and target.startswith(f"{PACKAGE}.experiments"):
                found.append(f"{source} imports {target} (figures read run directories only)")
            if source.startswith(f"{PACKAGE}.rundir") and not target.startswith((f"{PACKAGE}.rundir", f"{PACKAGE}.errors")):
                found.append(f"{source} imports {target} (the run directory depends on nothing above it)")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    edges, lines = graph()
    if not args.check:
        width = max(map(len, edges))
        for name in sorted(edges):
            short = sorted(t.removeprefix(PACKAGE + ".") for t in edges[name])
            print(f"{name:<{width}} {lines[name]:>5}  -> {', '.join(short)}")
        print(f"{len(edges)} modules, {sum(lines.values())} lines")
    problems = [" <-> ".join(c) for c in cycles(edges)] + violations(edges)
    for problem in problems:
        print(f"layout: {problem}", file=sys.stderr)
    if not problems:
        print("layout: no import circle; experiments import no experiment; figures import no experiment")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
