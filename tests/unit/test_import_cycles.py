"""The package's imports go one way: no module reaches itself through the modules it imports.

Every import counts, also those inside functions (a lazy import hides a cycle from Python but not
from the reader). Walked statically with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "torchtitan_clt"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a.b import c``: ``a.b.c`` if it is a
    module, else ``a.b``)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("torchtitan_clt") else None
                if target is not None and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_module_level_and_lazy_imports():
    g = import_graph(modules())
    assert "torchtitan_clt.checkpoint.plain" in g["torchtitan_clt.checkpoint.export"]  # module level
    assert "torchtitan_clt.checkpoint.plain" in g["torchtitan_clt.checkpoint.saelens"]  # in a function
    assert "torchtitan_clt.models.clt.model" in g["torchtitan_clt.models.clt"]  # a package's __init__


def test_no_import_cycles():
    found = cycles(import_graph(modules()))
    assert not found, "import cycles (break them with a leaf module both sides import):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def room(module: str) -> str:
    """The package's room a module lives in (``torchtitan_clt.models.clt.model`` -> ``models``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_rooms_import_one_way():
    """Between rooms the arrows go one way too (docs/internals.md draws them): the room graph has
    no cycle, and the model code never imports the distributed room (sharding is applied from
    outside, with the plan a family declares on its ModelSpec)."""
    rooms: dict[str, set[str]] = {}
    for mod, targets in import_graph(modules()).items():
        rooms.setdefault(room(mod), set()).update(room(t) for t in targets if room(t) != room(mod))
    found = cycles(rooms)
    assert not found, f"rooms that import each other: {found}"
    for leaf in ("models", "protocols", "kernels", "config"):
        assert "distributed" not in rooms[leaf], leaf
    assert rooms["errors"] == set() and rooms["config"] <= {"errors"}
