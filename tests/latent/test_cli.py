"""``collab latent train`` on tiny experts: trains, prints a summary, resumes an
interrupted run, names bad options; and the core stays free of CLI imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from collab.errors import CollabError, Interrupted

ARGS = ["--top-k", "2", "--stacks", "2", "--steps", "4", "--batch-size", "4", "--examples", "8", "--latent-dim", "16", "--heads", "2",
        "--encoder", "ngram", "--checkpoint-every", "2", "--quiet"]


def _app() -> Any:
    import typer

    from collab.latent.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


def test_cli_trains_and_resumes(tmp_path: Path, mot_dirs: list[Path], data_file: Path) -> None:
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from collab.latent.train import LatentTrainConfig, train_latent

    experts = f"{mot_dirs[0]},{mot_dirs[1]}"
    res = CliRunner().invoke(_app(), ["latent", "train", "--experts", experts, "--data", str(data_file), "--out", str(tmp_path / "whole"), *ARGS])
    assert res.exit_code == 0, res.output
    assert f"-> {tmp_path / 'whole'}" in res.output and "trainable parameters:" in res.output and "primary share:" in res.output
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert [e["ref"] for e in cfg["experts"]] == [str(mot_dirs[0]), str(mot_dirs[1])] and cfg["training"]["steps"] == 4

    # an interrupted run (the same settings as the command line's) resumes under the CLI
    same = LatentTrainConfig(top_k=2, stacks=2, steps=4, batch_size=4, examples=8, latent_dim=16, heads=2, encoder="ngram", checkpoint_every=2)
    with pytest.raises(Interrupted):
        train_latent([str(mot_dirs[0]), str(mot_dirs[1])], str(data_file), tmp_path / "resumed", same, stop_after=3)
    assert (tmp_path / ".resumed.checkpoint" / "state.json").is_file()
    res = CliRunner().invoke(_app(), ["latent", "train", "--experts", experts, "--data", str(data_file), "--out", str(tmp_path / "resumed"), *ARGS])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / ".resumed.checkpoint").exists()
    a, b = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experts", "EXPERTS", "--data", "DATA", "--out", "OUT", "--top-k", "3"], "--top-k: expected at most 2"),
        (["--experts", "EXPERTS", "--data", "DATA", "--out", "OUT", "--latent-dim", "15", "--heads", "2"], "--latent-dim: 15 is not divisible by --heads 2"),
        (["--experts", "EXPERTS", "--data", "DATA", "--out", "OUT", "--lr", "0"], "--lr: expected a positive number"),
        (["--experts", "ONE", "--data", "DATA", "--out", "OUT"], "--experts: expected at least two experts, found 1"),
    ],
)
def test_cli_names_bad_options(tmp_path: Path, mot_dirs: list[Path], data_file: Path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    values = {"EXPERTS": f"{mot_dirs[0]},{mot_dirs[1]}", "ONE": str(mot_dirs[0]), "DATA": str(data_file), "OUT": str(tmp_path / "o")}
    res = CliRunner().invoke(_app(), ["latent", "train", *[values.get(a, a) for a in args], "--encoder", "ngram", "--quiet"])
    assert isinstance(res.exception, CollabError) and message in str(res.exception), res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--data", "d.jsonl", "--out", "o"], "--experts"),
        (["--experts", "a,b", "--out", "o"], "--data"),
        (["--experts", "a,b", "--data", "d.jsonl"], "--out"),
        (["--experts", "a,b", "--data", "d.jsonl", "--out", "o", "--steps", "-1"], "--steps"),
        (["--experts", "a,b", "--data", "d.jsonl", "--out", "o", "--max-answer-tokens", "1"], "--max-answer-tokens"),
        (["--experts", "a,b", "--data", "d.jsonl", "--out", "o", "--balance-weight", "-0.5"], "--balance-weight"),
    ],
)
def test_cli_usage_errors_name_the_option_before_loading_anything(tmp_path: Path, args: list[str], option: str) -> None:
    """Missing options and values out of range stop at parsing: exit 2, the option named."""
    from typer.testing import CliRunner

    res = CliRunner().invoke(_app(), ["latent", "train", *args], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and f"'{option}'" in res.output, res.output


def test_train_help_documents_every_option() -> None:
    import inspect

    import typer.main
    from typer.testing import CliRunner

    from collab.latent.cli import train
    from collab.latent.train import LatentTrainConfig

    app = _app()
    res = CliRunner().invoke(app, ["latent", "train", "--help"], env={"COLUMNS": "240"})
    assert res.exit_code == 0, res.output
    command = typer.main.get_command(app).commands["latent"].commands["train"]  # type: ignore[attr-defined]
    options = [p for p in command.params if p.name != "help"]
    assert len(options) == 22
    for option in options:
        assert option.help, f"{option.opts[0]} has no help"
        assert option.opts[0] in res.output, option.opts[0]
    defaults = LatentTrainConfig()
    for name in ("top_k", "stacks", "steps", "batch_size", "latent_dim", "heads", "encoder", "lr", "gate_lr", "router_lr", "checkpoint_every", "seed"):
        assert inspect.signature(train).parameters[name].default == getattr(defaults, name), name  # the CLI's defaults are the library's


def test_collab_cli_lists_latent_train() -> None:
    from typer.testing import CliRunner

    from collab.cli import app

    res = CliRunner().invoke(app, ["latent", "--help"])
    assert res.exit_code == 0 and "train" in res.output


def test_importing_the_package_and_its_cli_loads_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, collab.latent, collab.latent.cli, collab.latent.system; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
