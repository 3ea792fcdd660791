"""The library's layers, read from its imports: no import runs back up, MONAI Label only where it is adapted."""

import ast
from pathlib import Path

import labelfactory

ROOT = Path(labelfactory.__file__).parent
MONAI_LABEL_USERS = {"tasks", "serve", "loop"}  # the adapters, the command that starts the server, its client


def _imports() -> dict[str, set[str]]:
    """{unit: the absolute module names it imports}; a unit is a subpackage or a top-level module of labelfactory."""
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        unit = rel.parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = (
                    [node.module] if node.module != "labelfactory" else [f"labelfactory.{a.name}" for a in node.names]
                )
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out.setdefault(unit, set()).update(names)
    return out


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "labelfactory" and len(parts) > 1 else None


def test_no_import_runs_back_up():
    """The graph of units (subpackages and top-level modules) has no cycle: each imports only units below it."""
    imports = _imports()
    edges = {u: {_unit(m) for m in ms} - {None, u} for u, ms in imports.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(edges.get(u, ())):
            assert state.get(v) != 1, f"import cycle: {' -> '.join([*path, u, v])}"
            if v not in state:
                visit(v, [*path, u])
        state[u] = 2

    for u in sorted(edges):
        if u not in state:
            visit(u, [])
    assert {"datasetgan", "stylegan2", "tasks"} <= set(edges)  # the walk saw the library


def test_monai_label_is_imported_only_by_its_adapters():
    users = {u for u, ms in _imports().items() if any(m.split(".")[0] == "monailabel" for m in ms)}
    assert users and users <= MONAI_LABEL_USERS, sorted(users - MONAI_LABEL_USERS)
