"""The house (docs/architecture.md): every import goes down a floor or stays on its own, and no
module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import msa

PACKAGE = Path(msa.__file__).parent
# Bottom first; a module imports only from its own floor or one below it.
FLOORS = ("core", "data", "cache", "models", "training", "stages")
TOP = len(FLOORS)  # msa/*.py: the CLI and the Python API


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else TOP


def imports(path: Path) -> set[str]:
    """The msa modules a file imports, at module level or inside functions ('from msa.x import y'
    counts y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "msa":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or \
                    (PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").is_file()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "msa"}
    return found


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_goes_down_or_stays_on_its_floor():
    upward = [f"{source} ({FLOORS[floor(source)] if floor(source) < TOP else 'top'}) imports {target}"
              for source, targets in GRAPH.items() for target in targets
              if floor(target) > floor(source) and target != "msa"]
    assert not upward, "\n".join(upward)


def test_the_ground_floor_imports_nothing_above_it():
    assert all(floor(t) == 0 for s, targets in GRAPH.items() if floor(s) == 0 for t in targets)


def test_no_import_circle():
    edges = {s: {t for t in targets if t in GRAPH and not (s == t.rsplit(".", 1)[0] and s in t)}
             for s, targets in GRAPH.items()}  # a package importing its own modules (registration) is no circle
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges.get(module, ()):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_every_floor_is_a_folder_and_nothing_else_is():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(FLOORS)
