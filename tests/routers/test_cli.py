from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    # the cost policy weighs the router's mean training costs (histy 4, mathy 1) and shows them
    r = runner.invoke(app, ["route", "ask", "--router", str(out), "--policy", "cost:0.5", "Tell me about the emperor war dynasty in rome"])
    assert r.exit_code == 0 and "routed to: mathy" in r.output and "why: best score - 0.5 x cost: mathy (" in r.output, r.output
    assert "costs: the router's mean training costs" in r.output and "cost 4\n" in r.output


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


def _train(data: Path, out: Path, *extra: str):  # noqa: ANN202 - click's Result
    return runner.invoke(app, ["route", "train", "--data", str(data), "--router", "knn", "--out", str(out), "-o", "encoder=tfidf", "-o", "k=10", *extra])


def test_eval_refuses_the_training_rows_and_all_flags_them(synth_path: Path, tmp_path: Path) -> None:
    from routers.base import RouterError

    out = tmp_path / "router"
    r = _train(synth_path, out)
    assert r.exit_code == 0 and "none held out" in r.output, r.output
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(synth_path), "--json"])
    assert r.exit_code == 1 and isinstance(r.exception, RouterError)
    assert f"{out}: was trained on every row of {synth_path} (160)" in str(r.exception) and "--test-size 0.2" in str(r.exception) and "--all" in str(r.exception)
    # --all scores them, and says so on stderr and in the JSON.
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(synth_path), "--json", "--all"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["rows"] == "all" and d["queries"] == 160 and d["training_rows"] == 160 and "measure fit, not routing" in d["warnings"][0]
    assert "warning: 160 of the 160 scored rows are ones the router was trained on (--all)" in r.stderr
    # A table half new, half training rows: only the new half is scored, and the rest is named.
    rows = [json.loads(line) for line in synth_path.read_text().splitlines()]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(dict(x, id=f"new{i}", prompt=f"new question {i}: {x['prompt']}") if i % 2 else x) + "\n" for i, x in enumerate(rows)))
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(mixed), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["rows"], d["queries"], d["table_rows"], d["training_rows"], d["left_out_training_rows"]) == ("untrained", 80, 160, 0, 80)
    assert "left out 80 rows whose prompt the router was trained on" in d["notes"] and not r.stderr
    # A router saved before training prompts were recorded: its own table is still recognised by its hash.
    (out / "train_prompts.sha256").unlink()
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(synth_path)])
    assert r.exit_code == 1 and "was trained on every row" in str(r.exception)
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(mixed), "--json"])
    d = json.loads(r.stdout)
    assert d["queries"] == 160 and d["training_rows"] is None and any("records no training prompts" in n for n in d["notes"])


def test_train_refuses_an_existing_out_unless_overwrite(synth_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from routers.base import Router, RouterError

    out = tmp_path / "router"
    assert _train(synth_path, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _train(synth_path, out, "-o", "k=5")
    assert r.exit_code == 1 and str(r.exception) == f"{out}: already exists; choose another --out or pass --overwrite to replace it"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Writing fails half-way: the old router stays whole and no partial directory is left.
    def broken(self: Router, directory: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Router, "_save_extra", broken)
    r = _train(synth_path, out, "-o", "k=5", "--test-size", "0.25", "--overwrite")  # other tensors, other files
    assert isinstance(r.exception, OSError) and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router", "table.jsonl"]
    monkeypatch.undo()
    r = _train(synth_path, out, "-o", "k=5", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["hyperparameters"]["k"] == 5
    # --overwrite replaces a router, never some other folder.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = _train(synth_path, other, "--overwrite")
    assert r.exit_code == 1 and isinstance(r.exception, RouterError) and "replaces only a trained router directory" in str(r.exception)
    assert (other / "keep.txt").read_text() == "mine"


def test_out_of_range_option_is_refused_before_training(synth_path: Path, tmp_path: Path) -> None:
    r = _train(synth_path, tmp_path / "r0", "-o", "k=0")
    assert r.exit_code == 1 and str(r.exception) == "router 'knn': option 'k': expected an integer >= 1, found 0"
    assert not (tmp_path / "r0").exists()


def test_eval_on_a_table_lacking_an_expert_names_it(synth_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "router"
    assert _train(synth_path, out, "--test-size", "0.25").exit_code == 0
    other = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in synth_path.read_text().splitlines()]
    other.write_text("".join(json.dumps(dict(x, scores={"mathy": x["scores"]["mathy"], "poet": 0.5}, costs={})) + "\n" for x in rows))
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(other)])
    assert r.exit_code == 1
    assert str(r.exception) == f"{other}: the table lacks expert 'histy', which the router ({out}) was trained on; the table has: mathy, poet; the router needs: mathy, histy"


def test_missing_cost_warning_is_one_clean_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.routers.conftest import synthetic_rows

    table = tmp_path / "nocost.jsonl"
    table.write_text("".join(json.dumps({k: v for k, v in x.items() if k != "costs"}) + "\n" for x in synthetic_rows(40)))
    exe = [sys.executable, "-c", "from collab.cli import main; main()"]
    p = subprocess.run(exe + ["route", "train", "--data", str(table), "--router", "best-single", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stderr == f"warning: {table}: 40 of 40 rows give no cost for some experts; those costs default to 1\n"


def test_artefact_records_its_tables_without_machine_paths(synth_path: Path, tmp_path: Path) -> None:
    from collab.io import sha256_file
    from routers.api import describe_source

    out = tmp_path / "router"
    assert _train(synth_path, out).exit_code == 0
    text = (out / "config.json").read_text()
    assert json.loads(text)["meta"]["train_sources"] == [{"name": "table.jsonl", "kind": "file", "sha256": sha256_file(synth_path)}]
    assert str(tmp_path) not in text
    assert describe_source("llmrouter") == {"name": "llmrouter", "kind": "shorthand"}
