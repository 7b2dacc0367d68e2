"""The floors of ARCHITECTURE.md, checked on the source: imports point down only, no cycles, short files.

Every module of difnumpy/ is parsed (imports inside functions included), so an import placed in a function
to dodge a cycle is caught like any other.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "difnumpy"

# the floors, lowest first (ARCHITECTURE.md): a module may import modules of its floor or below
FLOORS = [
    ("difnumpy._validation", 0), ("difnumpy._io", 0), ("difnumpy._console", 0), ("difnumpy.kernels", 0),
    ("difnumpy.schedules", 1), ("difnumpy.data", 1), ("difnumpy.nn", 1),
    ("difnumpy.diffusion", 2), ("difnumpy.testing", 2),
    ("difnumpy.samplers", 3), ("difnumpy.solvers", 3), ("difnumpy.metrics", 3), ("difnumpy.viz", 3),
    ("difnumpy.trainer", 4), ("difnumpy.checkpoint", 4), ("difnumpy.distributed", 4),
    ("difnumpy.train", 5), ("difnumpy", 5),  # the package itself: the public API, above the library
    ("difnumpy.cli", 6), ("difnumpy.__main__", 6),
]


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


def _floor(name: str) -> int:
    best = None
    for prefix, rank in FLOORS:
        if name == prefix or (prefix != "difnumpy" and name.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    if best is None:
        raise AssertionError(f"module {name} has no floor in tests/test_architecture.py (add it to FLOORS and "
                             f"to ARCHITECTURE.md)")
    return best[1]


def _imports(name: str, path: pathlib.Path, mods) -> set[str]:
    """The difnumpy modules ``name`` imports, anywhere in the file."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and not name.startswith(t + "."):
                out.add(t)
    return out


MODS = _modules()
GRAPH = {m: _imports(m, p, MODS) for m, p in MODS.items()}


def test_every_module_has_a_floor():
    for m in MODS:
        assert 0 <= _floor(m) <= 6, m


@pytest.mark.parametrize("module", sorted(MODS))
def test_imports_point_down_only(module):
    up = sorted(t for t in GRAPH[module] if _floor(t) > _floor(module))
    assert not up, f"{module} (floor {_floor(module)}) imports from above: {up}"


def test_kernels_import_nothing_from_above():
    for m, targets in GRAPH.items():
        if m.startswith("difnumpy.kernels"):
            bad = sorted(t for t in targets if not (t.startswith("difnumpy.kernels") or t in ("difnumpy._validation",
                                                                                            "difnumpy._io")))
            assert not bad, f"{m} imports {bad}"


def _find_cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    # the same code catches a synthetic cycle, an unknown module and an upward import
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert _floor("difnumpy.kernels.cpu.conv") == 0 and _floor("difnumpy.cli") == 6
    with pytest.raises(AssertionError):
        _floor("difnumpy.no_such_module")
    assert _floor("difnumpy.kernels") < _floor("difnumpy.nn.unet")


@pytest.mark.parametrize("module", sorted(MODS))
def test_no_module_is_longer_than_800_lines(module):
    n = MODS[module].read_text().count("\n") + 1
    assert n <= 800, f"{MODS[module]} has {n} lines"
