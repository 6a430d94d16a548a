"""The import graph stays a tree of layers: no cycles among the project's
modules (lazy, function-level imports included; ``if TYPE_CHECKING:`` blocks
excluded, they never run), and the core never imports the CLI library or the
method packages; they import the core, and the core reaches them only through
the system-type registry's entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("collab", "routers", "merging", "decoding", "evals")
METHOD_PACKAGES = ("routers", "merging", "decoding", "evals")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code, as written."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        for target in _imports(name, path):
            while target and target not in mods:  # `from collab.x import f` is an edge to collab.x
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_imports() -> None:
    graph = _graph()
    assert "collab.refs" in graph["collab.experts"]
    assert "collab.decode" in graph["collab.experts"]  # imported inside Expert.generate
    assert "collab.system" in graph["routers.system"]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_a_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_core_imports_no_cli_library_and_no_method_package() -> None:
    graph = _graph()
    mods = _modules()
    for name in sorted(graph):
        if not name.startswith("collab") or name == "collab.cli":
            continue
        wrong = sorted(t for t in graph[name] if t.split(".")[0] in METHOD_PACKAGES)
        assert not wrong, f"{name} imports {wrong}; the core reaches method packages only through the system-type registry"
        libs = {t.split(".")[0] for t in _imports(name, mods[name])}
        assert not libs & {"typer", "click"}, f"{name} imports the CLI library"


def test_resolving_a_domain_expert_loads_no_cli() -> None:
    code = (
        "import sys; from collab.refs import resolve_ref; resolve_ref('zoo:smol-arith'); "
        "print(sorted(m for m in ('typer', 'click', 'collab.cli', 'torch', 'routers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
