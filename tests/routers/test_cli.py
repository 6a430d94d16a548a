from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from collab.cli import app

runner = CliRunner()


def test_train_eval_ask(synth_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "router"
    r = runner.invoke(app, ["route", "train", "--data", str(synth_path), "--router", "knn", "--out", str(out), "-o", "encoder=tfidf", "-o", "k=10", "--test-size", "0.25"])
    assert r.exit_code == 0, r.output
    assert "trained knn router on 120 queries" in r.output and "40 held out" in r.output
    assert (out / "config.json").is_file() and (out / "router.safetensors").is_file()

    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(synth_path), "--json", "--plot", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["queries"] == 40
    for k in ("accuracy", "best_single", "oracle", "gap_closed", "cost", "apgr", "cpt50", "cpt80", "auc"):
        assert isinstance(d[k], float)
    assert d["accuracy"] > d["best_single"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"

    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(synth_path)])
    assert r.exit_code == 0 and "per-query oracle" in r.output and "gap closed" in r.output and "APGR" in r.output

    r = runner.invoke(app, ["route", "ask", "--router", str(out), "Please add the sum and product of 12", "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)
    assert a["routed_to"] == "mathy" and set(a["scores"]) == {"mathy", "histy"} and "highest predicted score" in a["reason"]
    r = runner.invoke(app, ["route", "ask", "--router", str(out), "Tell me about the emperor war dynasty in rome"])
    assert r.exit_code == 0 and "routed to: histy" in r.output


def test_cli_errors(tmp_path: Path, synth_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "x", "scores": {"m": 1.0}}) + "\n" + json.dumps({"id": "b", "prompt": "y", "scores": {"m": 1.0, "z": 0.0}}) + "\n")
    exe = [sys.executable, "-c", "from collab.cli import main; main()"]
    p = subprocess.run(exe + ["route", "train", "--data", str(bad), "--router", "knn", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 1 and "bad.jsonl: line 2: scores: unknown expert 'z'" in p.stderr
    p = subprocess.run(exe + ["route", "train", "--data", str(synth_path), "--router", "svm", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 1 and "unknown router 'svm'" in p.stderr
    p = subprocess.run(exe + ["route", "ask", "--router", str(tmp_path / "none"), "hi"], capture_output=True, text=True)
    assert p.returncode == 1 and "router directory not found" in p.stderr


def test_train_partition_router(synth_path: Path, tmp_path: Path) -> None:
    """The partition router trains from the CLI, records its validation choice, and evaluates."""
    out = tmp_path / "part"
    opts = ["-o", "encoder=tfidf", "-o", "repeats=2", "-o", "grid_clusters=[[2],[4]]", "-o", "grid_view=[\"all\"]"]
    r = runner.invoke(app, ["route", "train", "--data", str(synth_path), "--router", "partition", "--out", str(out), "--test-size", "0.25", *opts])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["type"] == "partition" and cfg["meta"]["validation"]["grid"]
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(synth_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["queries"] == 40 and d["accuracy"] > d["best_single"]
