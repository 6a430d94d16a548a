"""ColD Fusion (merging.cold) on tiny random Llamas: the invariants of
docs/cold.md, bit for bit, and the run record, resumption and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from collab.cli import app
from merging.cold import (
    ColdFusionConfig,
    ColdFusionError,
    average_models,
    cold_fusion,
    iteration_dir,
    linear_config,
    load_contributor,
    sample_contributors,
    trainer_config,
)
from tests.merging.conftest import load_weights
from tests.merging.test_parity import assert_bit_identical

SKILLS3 = ["skill:arith", "skill:lists", "skill:units"]
runner = CliRunner()


def tiny_config(base: Path, **kw: object) -> ColdFusionConfig:
    args: dict[str, object] = {"base": str(base), "contributors": SKILLS3, "iterations": 2, "per_iter": 2, "steps": 2,
                               "batch_size": 4, "train_examples": 32, "warmup_steps": 1, "learning_rate": 1e-2}
    args.update(kw)
    return ColdFusionConfig(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def straight(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two iterations of 2 of 3 contributors, run in one call, contributors kept."""
    out = tmp_path_factory.mktemp("cold") / "straight"
    cold_fusion(tiny_config(tiny_model_dir), out, quiet=True, keep_contributors=True)
    return out


def test_fusing_identical_models_returns_that_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    copies = [shutil.copytree(tiny_model_dir, tmp_path / f"copy{i}") for i in range(3)]
    fused = average_models([Path(c) for c in copies], tmp_path / "fused")
    assert_bit_identical(load_weights(fused), load_weights(tiny_model_dir))


def test_zero_steps_gives_the_base_from_the_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["fuse", "cold", "--base", str(tiny_model_dir), "--contributors", ",".join(SKILLS3), "--iterations", "2",
            "--steps", "0", "--batch-size", "4", "--out", str(out), "-q"]
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "iter-02" in res.output
    for t in (1, 2):
        assert_bit_identical(load_weights(iteration_dir(out, t)), load_weights(tiny_model_dir))
    from collab.experts import Expert

    Expert.load(iteration_dir(out, 2))  # a plain model directory with its tokenizer


def test_one_iteration_equals_collab_merge_linear_of_the_contributors(straight: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    first = iteration_dir(straight, 1)
    names = json.loads((first / "cold_metrics.json").read_text())["summary"]["contributors"]
    assert len(names) == 2
    config = tmp_path / "linear.yaml"
    config.write_text(yaml.safe_dump(linear_config([first / "contributors" / n for n in names])))
    res = runner.invoke(app, ["merge", str(config), str(tmp_path / "merged"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    fused = load_weights(first)
    assert_bit_identical(load_weights(tmp_path / "merged"), fused)
    # the iteration's own merge_config.yaml (inputs relative to it) reproduces it too
    res = runner.invoke(app, ["merge", str(first / "merge_config.yaml"), str(tmp_path / "again"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert_bit_identical(load_weights(tmp_path / "again"), fused)
    assert "ColD Fusion iteration 1" in (first / "README.md").read_text()
    base = load_weights(tiny_model_dir)
    assert any(not (fused[k] == base[k]).all() for k in base)  # it trained
    contributor = load_weights(first / "contributors" / names[0])
    assert any(not (fused[k] == contributor[k]).all() for k in base)  # and averaged


def test_k1_equals_sequential_fine_tuning(tiny_model_dir: Path, tmp_path: Path) -> None:
    from collab.zoo_build import save_merged, train_lora

    cfg = tiny_config(tiny_model_dir, contributors=["skill:arith", "skill:units"], per_iter=1, iterations=2, steps=3)
    cold_fusion(cfg, tmp_path / "cold", quiet=True)
    by_name = {c: load_contributor(f"skill:{c}", cfg) for c in ("arith", "units")}
    current = tiny_model_dir
    for t in (1, 2):
        (name,) = json.loads((iteration_dir(tmp_path / "cold", t) / "cold_metrics.json").read_text())["summary"]["contributors"]
        tcfg = trainer_config(cfg, by_name[name], t)
        run = train_lora(tcfg, by_name[name].examples, base=current)
        current = save_merged(run, tmp_path / f"seq{t}", side_files_from=current)
    assert_bit_identical(load_weights(iteration_dir(tmp_path / "cold", 2)), load_weights(current))


def test_resume_after_an_iteration_reproduces_the_next(straight: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    first = cold_fusion(tiny_config(tiny_model_dir, iterations=1), out, quiet=True)
    assert first.ran == [1]
    assert_bit_identical(load_weights(iteration_dir(out, 1)), load_weights(iteration_dir(straight, 1)))
    again = cold_fusion(tiny_config(tiny_model_dir), out, quiet=True)
    assert again.ran == [2] and again.final == iteration_dir(out, 2)
    assert_bit_identical(load_weights(iteration_dir(out, 2)), load_weights(iteration_dir(straight, 2)))
    assert cold_fusion(tiny_config(tiny_model_dir), out, quiet=True).ran == []  # nothing left to do
    record = json.loads((out / "cold.json").read_text())
    assert [it["iteration"] for it in record["iterations"]] == [1, 2]
    straight_record = json.loads((straight / "cold.json").read_text())
    assert [it["weights_sha256"] for it in record["iterations"]] == [it["weights_sha256"] for it in straight_record["iterations"]]


def test_resume_with_other_arguments_is_a_clear_error(straight: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ColdFusionError, match=r"'steps' differs.*stored 2, given 5"):
        cold_fusion(tiny_config(tiny_model_dir, steps=5), straight, quiet=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(ColdFusionError, match="not a ColD Fusion run"):
        cold_fusion(tiny_config(tiny_model_dir), tmp_path / "other", quiet=True)


def test_record_says_which_contributor_saw_which_data(straight: Path) -> None:
    from collab.io import sha256_text

    record = json.loads((straight / "cold.json").read_text())
    assert set(record["contributors"]) == {"arith", "lists", "units"}
    assert record["reference_url"].endswith("2212.01378")
    for it in record["iterations"]:
        metrics = json.loads((iteration_dir(straight, it["iteration"]) / "cold_metrics.json").read_text())
        assert metrics["summary"] == it
        assert [r["name"] for r in metrics["contributors"]] == it["contributors"]
        assert it["contributors"] == sample_contributors(["arith", "lists", "units"], 2, 0, it["iteration"])
        for row in metrics["contributors"]:
            assert len(row["seen_ids"]) == row["examples_seen"] == 2 * 4
            assert all(i.startswith(row["name"] + "-") for i in row["seen_ids"])  # only its own data
            assert row["seen_ids_sha256"] == sha256_text("\n".join(row["seen_ids"])) == it["seen_ids_sha256"][row["name"]]
            assert len(row["losses"]) == 2
    # the sampling is seeded and covers everyone over iterations
    picks = [tuple(sample_contributors(["a", "b", "c"], 2, 0, t)) for t in range(1, 30)]
    assert len(set(picks)) == 3 and picks == [tuple(sample_contributors(["a", "b", "c"], 2, 0, t)) for t in range(1, 30)]


def test_jsonl_contributors_and_their_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "greetings.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"Say hello {i}", "response": f"Hello {i}!"}) for i in range(8)) + "\n")
    cfg = tiny_config(tiny_model_dir, contributors=["skill:units", str(good)], per_iter=None, iterations=1, steps=1)
    res = cold_fusion(cfg, tmp_path / "run", quiet=True)
    rows = json.loads((res.final / "cold_metrics.json").read_text())["contributors"]
    assert [r["name"] for r in rows] == ["units", "greetings"]
    assert all(i.startswith("greetings-") for i in rows[1]["seen_ids"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ColdFusionError, match=r"bad.jsonl:2: field 'response'"):
        load_contributor(str(bad), cfg)
    with pytest.raises(ColdFusionError, match="unknown skill 'skill:poetry'"):
        load_contributor("skill:poetry", cfg)
    with pytest.raises(ColdFusionError, match="per_iter: expected at most 3"):
        tiny_config(tiny_model_dir, per_iter=4)


def test_an_interrupted_iteration_leaves_nothing_partial(straight: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import collab.zoo_build

    real = collab.zoo_build.train_lora
    calls = []

    def flaky(*args: object, **kw: object) -> object:
        calls.append(1)
        if len(calls) == 4:  # the second contributor of iteration 2
            raise KeyboardInterrupt("stopped")
        return real(*args, **kw)  # type: ignore[arg-type]

    out = tmp_path / "run"
    monkeypatch.setattr(collab.zoo_build, "train_lora", flaky)
    with pytest.raises(KeyboardInterrupt):
        cold_fusion(tiny_config(tiny_model_dir), out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["cold.json", "iter-01"]  # no partial iteration, no work files
    monkeypatch.setattr(collab.zoo_build, "train_lora", real)
    assert cold_fusion(tiny_config(tiny_model_dir), out, quiet=True).ran == [2]
    assert_bit_identical(load_weights(iteration_dir(out, 2)), load_weights(iteration_dir(straight, 2)))
