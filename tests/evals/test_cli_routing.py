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
