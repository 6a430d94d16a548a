"""``collab ccoe train|pop|push`` through the CLI: each writes what it says, pop
gives a model that transformers and ``Expert.load`` read, push refuses another
base, and bad options and missing files are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from collab.errors import CollabError

TRAIN = [
    "--layers",
    "2",
    "--steps",
    "3",
    "--batch-size",
    "2",
    "--examples",
    "6",
    "--max-tokens",
    "40",
    "--quiet",
]


def _app() -> Any:
    import typer

    from collab.ccoe.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


def _invoke(*args: str) -> Any:
    from typer.testing import CliRunner

    return CliRunner().invoke(_app(), ["ccoe", *args])


def test_train_pop_push_round_trip(tmp_path: Path, base_dir: Path, base: Any) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from collab.experts import Expert
    from collab.system import GenerationRequest

    res = _invoke(
        "train",
        "--base",
        str(base_dir),
        "--skill",
        "units",
        "--out",
        str(tmp_path / "units"),
        *TRAIN,
    )
    assert res.exit_code == 0, res.output
    assert (
        f"trained expert 'units' (layers 2..3 of {base_dir}) -> {tmp_path / 'units'}"
        in res.output
        and "trainable parameters:" in res.output
    )
    cfg = json.loads((tmp_path / "units" / "config.json").read_text())
    assert (
        cfg["type"] == "ccoe"
        and cfg["depth"] == 2
        and cfg["layers"] == 2
        and cfg["training"]["steps"] == 3
        and cfg["data"]["source"] == "skill:units"
    )
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == [
        "branch.safetensors",
        "config.json",
    ]

    res = _invoke(
        "pop",
        "--expert",
        str(tmp_path / "units"),
        "--out",
        str(tmp_path / "units-model"),
    )
    assert res.exit_code == 0, res.output
    assert "popped expert 'units'" in res.output
    model_dir = tmp_path / "units-model"
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "collab_ccoe.json",
    } <= {p.name for p in model_dir.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert next(hf.parameters()).dtype == torch.float32
    popped = Expert.load(model_dir, name="units")
    branch = load_file(str(tmp_path / "units" / "branch.safetensors"))
    state = popped.model.state_dict()
    assert all(torch.equal(state[k], branch[k]) for k in branch)
    assert all(
        torch.equal(v, base.model.state_dict()[k])
        for k, v in state.items()
        if k not in branch
    )
    assert (
        popped.generate(
            GenerationRequest.chat("Convert 3 km to m.", max_tokens=4)
        ).usage.completion_tokens
        > 0
    )

    res = _invoke(
        "push",
        "--base",
        str(base_dir),
        "--model",
        str(model_dir),
        "--layers",
        "2",
        "--out",
        str(tmp_path / "back"),
        "--name",
        "units",
    )
    assert res.exit_code == 0, res.output
    assert "pushed expert 'units' (layers 2..3" in res.output
    back = load_file(str(tmp_path / "back" / "branch.safetensors"))
    assert sorted(back) == sorted(branch) and all(
        torch.equal(back[k], branch[k]) for k in back
    )


def test_a_popped_expert_is_an_input_collab_merge_takes(tmp_path: Path, base_dir: Path) -> None:
    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    assert _invoke("train", "--base", str(base_dir), "--skill", "units", "--out", str(tmp_path / "units"), *TRAIN).exit_code == 0
    assert _invoke("pop", "--expert", str(tmp_path / "units"), "--out", str(tmp_path / "popped")).exit_code == 0
    config = tmp_path / "merge.yaml"
    # the popped expert and the base, averaged: the bottom layers stay the base's, bit for bit
    models = [{"model": str(tmp_path / "popped"), "parameters": {"weight": 1.0}}, {"model": str(base_dir), "parameters": {"weight": 1.0}}]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, "dtype": "float32"}))
    from collab.cli import app

    res = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "merged"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    popped = load_file(str(tmp_path / "popped" / "model.safetensors"))
    branch = load_file(str(tmp_path / "units" / "branch.safetensors"))
    assert merged.keys() >= branch.keys()
    assert all(torch.equal(merged[k], popped[k]) for k in merged if k not in branch)
    assert all(torch.allclose(merged[k], (popped[k] + load_file(str(base_dir / "model.safetensors"))[k]) / 2, atol=1e-6) for k in branch)


def test_train_reads_a_jsonl_file(tmp_path: Path, base_dir: Path) -> None:
    data = tmp_path / "conv.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Reverse [{a}, {a + 1}]."},
                        {"role": "assistant", "content": f"[{a + 1}, {a}]"},
                    ]
                }
            )
            + "\n"
            for a in range(4)
        )
    )
    res = _invoke(
        "train",
        "--base",
        str(base_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "rev"),
        *TRAIN,
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "rev" / "config.json").read_text())
    assert cfg["name"] == "conv" and cfg["data"]["examples"] == 4


def test_push_refuses_a_model_whose_backbone_differs(
    tmp_path: Path, base_dir: Path, other_base_dir: Path, experts: dict[str, Path]
) -> None:
    res = _invoke(
        "push",
        "--base",
        str(base_dir),
        "--model",
        str(other_base_dir),
        "--layers",
        "2",
        "--out",
        str(tmp_path / "x"),
    )
    assert isinstance(res.exception, CollabError), res.output
    assert "model.embed_tokens.weight differs from the base's" in str(
        res.exception
    ) and "must be the base's exactly" in str(res.exception)
    assert not (tmp_path / "x").exists()
    # a popped expert of 2 layers pushed as 1: its layer 2 is not the base's
    model_dir = tmp_path / "arith-model"
    assert (
        _invoke(
            "pop", "--expert", str(experts["arith"]), "--out", str(model_dir)
        ).exit_code
        == 0
    )
    res = _invoke(
        "push",
        "--base",
        str(base_dir),
        "--model",
        str(model_dir),
        "--layers",
        "1",
        "--out",
        str(tmp_path / "y"),
    )
    assert (
        isinstance(res.exception, CollabError)
        and "model.layers.2." in str(res.exception)
        and "only layers 3..3 may differ" in str(res.exception)
    )


def test_pop_refuses_another_base(
    tmp_path: Path, other_base_dir: Path, experts: dict[str, Path]
) -> None:
    res = _invoke(
        "pop",
        "--expert",
        str(experts["arith"]),
        "--out",
        str(tmp_path / "m"),
        "--base",
        str(other_base_dir),
    )
    assert isinstance(
        res.exception, CollabError
    ) and "trained on another backbone" in str(res.exception)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "train",
                "--base",
                "BASE",
                "--out",
                "OUT",
                "--skill",
                "arith",
                "--data",
                "x.jsonl",
            ],
            "exactly one of --skill NAME or --data",
        ),
        (
            ["train", "--base", "BASE", "--out", "OUT"],
            "exactly one of --skill NAME or --data",
        ),
        (
            ["train", "--base", "BASE", "--out", "OUT", "--skill", "poetry"],
            "skill:poetry: unknown skill",
        ),
        (
            ["train", "--base", "BASE", "--out", "OUT", "--data", "MISSING"],
            "training data not found",
        ),
        (
            [
                "train",
                "--base",
                "BASE",
                "--out",
                "OUT",
                "--skill",
                "arith",
                "--layers",
                "5",
            ],
            "--layers: the base has 4 decoder layers",
        ),
        (
            ["train", "--base", "BASE", "--out", "EXISTS", "--skill", "arith"],
            "already exists",
        ),
        (
            ["train", "--base", "MISSING", "--out", "OUT", "--skill", "arith"],
            "no such file or directory",
        ),
        (
            ["pop", "--expert", "MISSING", "--out", "OUT"],
            "CCoE expert directory not found",
        ),
        (
            ["pop", "--expert", "NOBRANCH", "--out", "OUT"],
            "branch.safetensors not found",
        ),
        (["pop", "--expert", "BASE", "--out", "OUT"], "type: expected 'ccoe'"),
        (
            [
                "push",
                "--base",
                "BASE",
                "--model",
                "MISSING",
                "--layers",
                "1",
                "--out",
                "OUT",
            ],
            "no such file or directory",
        ),
        (
            [
                "push",
                "--base",
                "BASE",
                "--model",
                "BASE",
                "--layers",
                "9",
                "--out",
                "OUT",
            ],
            "--layers: the base has 4 decoder layers",
        ),
    ],
)
def test_errors_name_what_is_wrong(
    tmp_path: Path,
    base_dir: Path,
    experts: dict[str, Path],
    args: list[str],
    message: str,
) -> None:
    import shutil

    nobranch = tmp_path / "nobranch"
    shutil.copytree(experts["arith"], nobranch)
    (nobranch / "branch.safetensors").unlink()
    (tmp_path / "exists").mkdir()
    values = {
        "BASE": str(base_dir),
        "OUT": str(tmp_path / "out"),
        "EXISTS": str(tmp_path / "exists"),
        "MISSING": str(tmp_path / "missing"),
        "NOBRANCH": str(nobranch),
    }
    res = _invoke(
        *[
            values.get(a, a)
            for a in [*args, "--quiet"]
            if not (a == "--quiet" and args[0] != "train")
        ]
    )
    assert isinstance(res.exception, CollabError) and message in str(res.exception), (
        res.output,
        res.exception,
    )
    assert not (tmp_path / "out").exists()


def test_missing_options_are_usage_errors() -> None:
    res = _invoke("train", "--skill", "arith", "--out", "o")
    assert res.exit_code == 2 and "--base" in res.output
    res = _invoke("push", "--base", "b", "--model", "m", "--out", "o")
    assert res.exit_code == 2 and "--layers" in res.output


def test_the_collab_cli_mounts_ccoe() -> None:
    from typer.testing import CliRunner

    from collab.cli import app

    res = CliRunner().invoke(app, ["ccoe", "--help"])
    assert res.exit_code == 0 and all(
        cmd in res.output for cmd in ("train", "pop", "push")
    )


def test_ctrl_c_keeps_a_checkpoint_exits_130_and_the_rerun_resumes(
    tmp_path: Path,
    base_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sys

    import collab.ccoe.train as train_module
    from collab.cli import main

    real, calls = train_module.step_loss, []

    def ctrl_c_at_the_third_step(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "arith"
    argv = [
        "collab",
        "ccoe",
        "train",
        "--base",
        str(base_dir),
        "--skill",
        "arith",
        "--out",
        str(out),
        *TRAIN,
    ]
    monkeypatch.setattr(train_module, "step_loss", ctrl_c_at_the_third_step)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert (
        "interrupted: training stopped after step 2 of 3" in err
        and "rerun the same command to resume" in err
    )
    state = json.loads((tmp_path / ".arith.checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not out.exists()
    monkeypatch.setattr(train_module, "step_loss", real)
    main()  # resumes and finishes: no SystemExit
    assert (
        json.loads((out / "config.json").read_text())["metrics"]["losses"][:2]
        == state["losses"]
    )
    assert not (tmp_path / ".arith.checkpoint").exists()
