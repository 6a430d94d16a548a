"""The import graph stays a tree of layers: no cycles among the project's
modules (lazy, function-level imports included; ``if TYPE_CHECKING:`` blocks
excluded, they never run), and the core never imports the method packages (they
import the core, and the core reaches them only through the system-type
registry's entry points). Only command modules (``collab.cli``, ``collab.*.cli``)
import the CLI library, and nothing in the core imports a command module:
``collab.cli`` loads them by name (COMMAND_MODULES)."""

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


def _is_cli(module: str) -> bool:
    """A command module: ``collab.cli``, ``collab.latent.cli``, ``routers.cli``."""
    return module.rpartition(".")[2] == "cli"


def _core_violations(graph: dict[str, set[str]], libraries: dict[str, set[str]]) -> list[str]:
    """How the core (every ``collab*`` module) breaks the layering, given each
    module's edges to the project's modules and the top-level libraries it imports:

    - no core module imports a method package (the system-type registry reaches them);
    - only the core's command modules (named ``cli``) import the CLI library;
    - no core module imports a command module: ``collab.cli`` reaches them by name
      through COMMAND_MODULES, and nothing else reaches them at all.
    """
    wrong: list[str] = []
    for name in sorted(graph):
        if name.split(".")[0] != "collab":
            continue
        methods = sorted(t for t in graph[name] if t.split(".")[0] in METHOD_PACKAGES)
        if methods and name != "collab.cli":
            wrong.append(f"{name} imports {methods}; the core reaches method packages only through the system-type registry")
        commands = sorted(t for t in graph[name] if _is_cli(t))
        if commands:
            wrong.append(f"{name} imports {commands}; command modules are reached only through collab.cli's COMMAND_MODULES")
        cli_libs = sorted(libraries[name] & {"typer", "click"})
        if cli_libs and not _is_cli(name):
            wrong.append(f"{name} imports the CLI library ({', '.join(cli_libs)}); only command modules (named cli) may")
    return wrong


def test_core_imports_no_cli_library_and_no_method_package() -> None:
    mods = _modules()
    libraries = {name: {t.split(".")[0] for t in _imports(name, path)} for name, path in mods.items()}
    wrong = _core_violations(_graph(), libraries)
    assert not wrong, "\n".join(wrong)


def test_core_violations_are_found() -> None:
    graph = {
        "collab.cli": {"collab.spec"},
        "collab.spec": {"collab.errors"},
        "collab.errors": set(),
        "collab.latent.cli": {"collab.latent.train"},
        "collab.latent.train": {"collab.errors"},
    }
    libraries = {name: set() for name in graph} | {"collab.cli": {"typer"}, "collab.latent.cli": {"typer", "click"}}
    assert _core_violations(graph, libraries) == []  # command modules may use typer and click
    bad_graph = {**graph, "collab.spec": {"collab.latent.cli", "routers.base"}, "collab.cli": {"collab.latent.cli"}}
    bad_libraries = {**libraries, "collab.latent.train": {"typer"}}
    assert _core_violations(bad_graph, bad_libraries) == [
        "collab.cli imports ['collab.latent.cli']; command modules are reached only through collab.cli's COMMAND_MODULES",
        "collab.latent.train imports the CLI library (typer); only command modules (named cli) may",
        "collab.spec imports ['routers.base']; the core reaches method packages only through the system-type registry",
        "collab.spec imports ['collab.latent.cli']; command modules are reached only through collab.cli's COMMAND_MODULES",
    ]


def test_command_modules_are_named_cli() -> None:
    from collab.cli import COMMAND_MODULES

    assert all(_is_cli(m) for m in COMMAND_MODULES), COMMAND_MODULES
    core_cli = sorted(m for m in _modules() if m.startswith("collab.") and _is_cli(m) and m != "collab.cli")
    assert set(core_cli) <= set(COMMAND_MODULES), f"{core_cli}: a command module in the core that collab.cli does not register"


def test_resolving_a_domain_expert_loads_no_cli() -> None:
    code = (
        "import sys; from collab.refs import resolve_ref; resolve_ref('zoo:smol-arith'); "
        "print(sorted(m for m in ('typer', 'click', 'collab.cli', 'torch', 'routers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
