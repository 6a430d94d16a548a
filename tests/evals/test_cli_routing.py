from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from collab.cli import app


@pytest.fixture()
def spec(tmp_path: Path, long_tiny_dir: Path, long_tiny_dir2: Path) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(f"experts:\n  a: {{ref: {long_tiny_dir}}}\n  b: {{ref: {long_tiny_dir2}}}\n")
    return p


def test_routing_table_is_canonical_jsonl(tmp_path: Path, spec: Path) -> None:
    out = tmp_path / "table.jsonl"
    r = CliRunner().invoke(app, ["eval", str(spec), "--systems", "a,b", "--bench", "arc_easy,boolq", "--limit", "3", "--routing-table", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert [row["task"] for row in rows] == ["arc_easy"] * 3 + ["boolq"] * 3
    for row in rows:
        assert set(row) == {"id", "task", "prompt", "scores", "costs"}
        assert set(row["scores"]) == {"a", "b"} and all(v in (0.0, 1.0) for v in row["scores"].values())
        assert all(v > 0 for v in row["costs"].values())
    assert rows[0]["id"] == "arc_easy/MCAS_2000_4_6"
    assert rows[0]["prompt"].startswith("Which technology was developed most recently?\nA. cellular telephone")
    # The per-run directories make collection resumable.
    assert (tmp_path / "table.jsonl.runs" / "arc_easy" / "a" / "summary.json").exists()
    try:
        from routers.table import RoutingTable
    except ImportError:
        return
    table = RoutingTable.load(out)
    assert len(table) == 6 and sorted(table.experts) == ["a", "b"]


def test_eval_several_systems_table_json_and_compare(tmp_path: Path, spec: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(spec), "--systems", "a,b", "--bench", "piqa", "--limit", "4", "--out", str(tmp_path / "runs"), "-q"])
    assert r.exit_code == 0, r.output
    assert "piqa" in r.output and "n=4" in r.output
    r = runner.invoke(app, ["eval", str(spec), "--system", "a", "--bench", "piqa", "--limit", "4", "--out", str(tmp_path / "runs" / "piqa" / "a"), "--json", "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["system"] == "a" and summary["n"] == 4 and summary["status"] == "complete"
    png = tmp_path / "cmp.png"
    r = runner.invoke(app, ["eval", "--compare", str(tmp_path / "runs" / "piqa" / "a"), str(tmp_path / "runs" / "piqa" / "b"), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "piqa" in r.output and "[" in r.output


def test_unknown_names_exit_nonzero_with_known_names(tmp_path: Path, spec: Path) -> None:
    cmd = [sys.executable, "-m", "collab.cli", "eval", str(spec), "--system", "a", "--bench", "gsm9k"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "unknown benchmark 'gsm9k'" in p.stderr and "gsm8k" in p.stderr
    r = CliRunner().invoke(app, ["eval", str(spec), "--system", "zz", "--bench", "gsm8k"])
    assert r.exit_code != 0 and "unknown system 'zz'" in str(r.exception) and "a, b" in str(r.exception)
    r = CliRunner().invoke(app, ["eval", "--compare", str(tmp_path)])
    assert r.exit_code != 0 and "not an evaluation run" in str(r.exception)


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_max_tokens_must_be_positive(bad: str) -> None:
    r = CliRunner().invoke(app, ["eval", "zoo:not-loaded", "--bench", "gsm8k", "--max-tokens", bad], terminal_width=200)
    assert r.exit_code == 2 and "Invalid value for '--max-tokens': Input should be greater than or equal to 1" in r.output


def test_interrupted_eval_prints_the_command_that_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    import evals.cli
    from collab.errors import Interrupted

    # importing test_runner registers the benchmark test:arith
    from tests.evals.test_runner import Calculator

    systems = [Calculator(crash_after=3), Calculator()]
    monkeypatch.setattr(evals.cli, "_systems", lambda target, names: (["calc"], lambda _n: systems.pop(0)))
    out = tmp_path / "my run"
    argv = ["eval", "spec.yaml", "-s", "calc", "-b", "test:arith", "-o", str(out), "--batch-size", "2", "-q"]
    r = CliRunner().invoke(app, argv)
    assert isinstance(r.exception, Interrupted), r.output
    msg = str(r.exception)
    want = f"collab eval spec.yaml --system calc --bench test:arith --out '{out}' --batch-size 2 --quiet"
    assert "stopped by Ctrl-C after 2 of 10 examples" in msg and msg.endswith(f"resume with: {want}")
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    r = CliRunner().invoke(app, shlex.split(want)[1:])  # the printed command, as given
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["n"] == 10 and not systems


def test_ctrl_c_on_the_command_line_exits_130_and_keeps_the_run(tmp_path: Path, long_tiny_dir: Path) -> None:
    import os
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "collab.cli", "eval", str(long_tiny_dir), "--bench", "gsm8k", "--limit", "40", "--batch-size", "1", "--max-tokens", "24", "--out", str(out), "-q"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    done = [json.loads(line) for line in results.read_text().splitlines()]
    assert summary["status"] == "interrupted" and summary["n"] == len(done) >= 2 and summary["total"] == 40
    # One line, no traceback: what stopped, what is kept, how to resume.
    assert len(err.strip().splitlines()) == 1, err
    assert f"'{summary['system']}' on 'gsm8k' stopped by Ctrl-C after {len(done)} of 40 examples" in err
    assert f"resume with: collab eval {long_tiny_dir} --bench gsm8k --limit 40 --out {out} --batch-size 1 --max-tokens 24 --quiet" in err


def test_quiet_turns_off_the_libraries_progress_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    import evals.cli
    from tests.evals.test_runner import Calculator

    monkeypatch.setattr(evals.cli, "_systems", lambda target, names: (["calc"], lambda _n: Calculator()))
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    before = hf_logging.is_progress_bar_enabled()  # loading an Expert turns them off for the process
    hf_logging.enable_progress_bar()
    try:
        r = CliRunner().invoke(app, ["eval", "spec.yaml", "--bench", "test:arith", "--limit", "2"])
        assert r.exit_code == 0, r.output
        assert hf_logging.is_progress_bar_enabled()  # without -q nothing changes
        r = CliRunner().invoke(app, ["eval", "spec.yaml", "--bench", "test:arith", "--limit", "2", "-q"])
        assert r.exit_code == 0, r.output
        assert not hf_logging.is_progress_bar_enabled()  # transformers' "Loading weights" and hub downloads
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
