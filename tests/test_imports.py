"""The import graph of align_rl: no cycle between its modules, ``actors`` imported only by the
commands (the dependency runs actors → align_rl), no command importing another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "align_rl"
COMMANDS = {"align_rl.train", "align_rl.pretrain", "align_rl.evaluate", "align_rl.sweep",
            "align_rl.score", "align_rl.data.__main__", "align_rl.network"}
"""The thin commands (``python -m align_rl.<command>``): they compose a job, so they alone may
import ``actors`` (to supply its Ray actors, :func:`actors.install`)."""


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _targets(node: ast.AST, here: str) -> list[str]:
    """The modules an import statement names (``from a.b import c``: ``a.b.c`` when that is a
    module, else ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative import
        pkg = here.split(".")
        pkg = pkg[: len(pkg) - node.level + (1 if MODULES[here].name == "__init__.py" else 0)]
        base = ".".join(pkg + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _type_checking_only(tree: ast.Module) -> None:
    """Drop ``if TYPE_CHECKING:`` blocks: annotations only, never imported at run time."""
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list):
                setattr(node, field, [s for s in stmts if not (
                    isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test))])


def _imports(mod: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    _type_checking_only(tree)
    if top_level_only:  # statements run when the module is imported (also inside if / try)
        nodes: list[ast.AST] = []
        todo = list(tree.body)
        while todo:
            n = todo.pop()
            nodes.append(n)
            if isinstance(n, (ast.If, ast.Try, ast.With)):
                todo += [c for c in ast.iter_child_nodes(n) if isinstance(c, ast.stmt)]
                for h in getattr(n, "handlers", []):
                    todo += h.body
    else:
        nodes = list(ast.walk(tree))
    return {t for n in nodes for t in _targets(n, mod)}


def _graph(top_level_only: bool = True) -> dict[str, set[str]]:
    return {m: {t for t in _imports(m, top_level_only) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package():
    assert {"align_rl.pipeline", "align_rl.io.checkpoints", "align_rl.models.forecaster",
            "align_rl.logs", "align_rl.remote"} <= set(MODULES)
    g = _graph()
    assert "align_rl.models.forecaster" in g["align_rl.io.checkpoints"]
    assert "align_rl.io.checkpoints" in g["align_rl.models.loading"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph(top_level_only=True))
    assert not cycles, "import cycles (module-level imports): " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_no_cycle_through_function_local_imports_either():
    """A function-local import hides a dependency but is one: the graph stays one-way with them."""
    cycles = _cycles(_graph(top_level_only=False))
    assert not cycles, "import cycles (with function-local imports): " + "; ".join(" ↔ ".join(c) for c in cycles)
    assert "align_rl.io.checkpoints" not in _graph(False)["align_rl.models.forecaster"]


@pytest.mark.parametrize("mod", sorted(set(MODULES) - COMMANDS))
def test_the_library_never_imports_actors(mod):
    bad = sorted(t for t in _imports(mod, top_level_only=False) if t == "actors" or t.startswith("actors."))
    assert not bad, f"{mod} imports {bad}: take the actors from align_rl.remote instead"


def test_no_command_imports_another():
    for mod in COMMANDS:
        others = _imports(mod, top_level_only=False) & (COMMANDS - {mod})
        assert not others, f"{mod} imports the commands {sorted(others)}"
