"""Every command the README and docs/ show parses against the real CLI, and
every repository file they name exists. The commands are run by hand and by
the slow tests of each package; this test catches what drifts in between: a
renamed option, a moved example, a file that was never shipped."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Top-level folders whose files a command may name; anything else (out/, runs/,
#: artefacts/, table.jsonl) is an output or the user's own file.
SHIPPED = ("examples/", "bench/", "collab/", "routers/", "merging/", "evals/", "decoding/", "tests/", "docs/")


def _commands() -> list[tuple[str, int, str]]:
    """(doc, line, command) for each ``collab ...`` line in a bash block, with
    backslash continuations joined and trailing comments dropped."""
    found = []
    for doc in DOCS:
        in_bash = False
        pending = ""
        start = 0
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                in_bash = line.strip() in ("```bash", "```sh", "```console")
                continue
            if not in_bash:
                continue
            text = pending + line.strip()
            if not pending:
                start = n
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            text = re.sub(r"\s+#.*$", "", text)
            if re.match(r"(collab|collab-lm-eval)\s", text + " "):
                found.append((doc.relative_to(ROOT).as_posix(), start, text))
    return found


COMMANDS = _commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) > 40
    assert {doc for doc, _, _ in COMMANDS} >= {"README.md", "docs/evals.md", "docs/routers.md", "docs/merging.md", "docs/zoo.md"}


def _leaf(root: Any, args: list[str]) -> tuple[Any, list[str], str]:
    cmd, path = root, ["collab"]
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):
        name = args.pop(0)
        assert name in cmd.commands, f"'{' '.join(path)}' has no command '{name}'"
        cmd, path = cmd.commands[name], [*path, name]
    return cmd, args, " ".join(path)


@pytest.mark.parametrize("doc, line, command", COMMANDS, ids=[f"{d}:{n}" for d, n, _ in COMMANDS])
def test_documented_command_parses_and_names_shipped_files(doc: str, line: int, command: str) -> None:
    import typer

    from collab.cli import app

    args = shlex.split(command)
    for arg in args[1:]:
        for part in re.split(r"[=,]", arg):
            if part.startswith(SHIPPED) and "..." not in part:
                assert (ROOT / part).exists(), f"{doc}:{line}: '{part}' is not in the repository"
    if args[0] == "collab-lm-eval":
        return  # lm-eval's own parser; its spec= paths are checked above
    root = typer.main.get_command(app)
    rest = args[1:]
    while rest and rest[0].startswith("--") and rest[0] in ("--debug",):
        rest.pop(0)
    leaf, rest, name = _leaf(root, rest)
    if rest == ["--help"] or not rest and hasattr(leaf, "commands"):
        return
    # parses and converts every option and argument as the real command would, without running it
    leaf.make_context(name, list(rest))


def _python_blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/guide.md"])
def test_python_snippets_run_as_written(doc: str) -> None:
    """The README's and the guide's Python examples are whole programs on the real models."""
    import subprocess
    import sys

    blocks = _python_blocks(ROOT / doc)
    assert blocks
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert out.returncode == 0, f"{doc}: snippet failed:\n{code}\n{out.stderr[-2000:]}"
        assert out.stdout.strip()
