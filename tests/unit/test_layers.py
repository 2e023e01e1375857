"""The layers of orthros_py point one way (STYLE.md): cli -> bench -> policies -> cluster ->
agent -> lab, checkpoint, workloads -> netlock -> host -> criu, cgroup -> net, proc, inventory,
run -> errors. Every import of an orthros_py module, function-local ones included, is read from
the source, so an arrow back up or a circle fails here before it hides in a lazy import."""

from __future__ import annotations

import ast
from pathlib import Path

import orthros_py

PKG = Path(orthros_py.__file__).parent

# A unit may import units of a lower rank, or of its own rank when that makes no circle.
RANK = {
    "errors": 0,
    "run": 1, "proc": 1, "net": 1, "inventory": 1,
    "criu": 2, "cgroup": 2,
    "host": 3,
    "netlock": 4,
    # Workloads may drive the lab (a cluster of them, one per lab host: workloads.etcd).
    "checkpoint": 5, "lab": 5, "workloads": 5,
    "agent": 6,
    "cluster": 7,
    "policies": 8,
    "bench": 9,
    "cli": 10,
    "__main__": 11,
}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "orthros_py" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        src = rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else None
        if src is None:
            continue
        for mod in _imports(path):
            dst = _unit(mod)
            if dst is not None and dst in RANK and dst != src:
                edges.setdefault(src, set()).add(dst)
    return edges


def test_every_unit_has_a_rank() -> None:
    units = {p.name.removesuffix(".py") for p in PKG.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or
             (p.suffix == ".py" and p.name != "__init__.py")}
    assert units == set(RANK), "give a new package its place in RANK"


def test_no_import_runs_back_up() -> None:
    up = sorted(f"{a} -> {b}" for a, bs in _edges().items() for b in bs if RANK[b] > RANK[a])
    assert up == []


def test_no_circle_between_units() -> None:
    edges = _edges()
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert seen.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for unit in sorted(RANK):
        if unit not in seen:
            visit(unit, [])
