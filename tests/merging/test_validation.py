"""Checks every merge passes before anything is written (and in --dry-run):
the inputs agree on tensor names and shapes, and the config's top-level keys,
method and dtypes are known, with errors that name the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from merging import MergeError, merge


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llamas of 2 and 3 layers (otherwise equal), and a 2-layer one with
    tied embeddings (no lm_head.weight)."""
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("layered")
    return {
        "two": make_tiny_model(root / "two", seed=0, layers=2),
        "three": make_tiny_model(root / "three", seed=1, layers=3),
        "tied": make_tiny_model(root / "tied", seed=2, layers=2, tie_embeddings=True),
    }


def _config(method: str, first: Path, second: Path) -> dict[str, Any]:
    """A ``method`` merge of ``first`` and ``second``, listed in that order (and
    ``first`` as the base for task-vector methods)."""
    models = [{"model": str(first), "parameters": {"weight": 0.5}}, {"model": str(second), "parameters": {"weight": 0.5}}]
    cfg: dict[str, Any] = {"models": models, "merge_method": method, "dtype": "float32"}
    if method in ("task_arithmetic", "ties", "ties_fast"):
        cfg["base_model"] = str(first)
        models[0].pop("parameters")
        if method != "task_arithmetic":
            models[1]["parameters"]["density"] = 0.5
    if method == "linear_gradient":
        cfg["merge_method"] = "linear"
        models[0]["parameters"]["weight"] = [0.2, 0.8]
    if method == "linear_run_merge":  # a tokenizer rule sends the merge through mergekit's run_merge
        cfg["merge_method"] = "linear"
        cfg["tokenizer_source"] = "base"
    if method == "regmean":
        cfg["parameters"] = {"calibration": "unused.txt"}  # the check fails before calibration is read
    return cfg


# the engine with collab's kernels (task_arithmetic, ties_fast), mergekit's (linear, ties, a
# gradient), data-aware methods (regmean, weight_matching), and mergekit's run_merge (a tokenizer rule)
METHODS = ["linear", "task_arithmetic", "ties_fast", "ties", "linear_gradient", "linear_run_merge", "regmean", "weight_matching"]


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
@pytest.mark.parametrize("order", [("two", "three"), ("three", "two")], ids=["2-then-3", "3-then-2"])
@pytest.mark.parametrize("method", METHODS)
def test_models_with_different_layer_counts_fail_before_writing(
    method: str, order: tuple[str, str], dry_run: bool, layered: dict[str, Path], tmp_path: Path
) -> None:
    first, second = layered[order[0]], layered[order[1]]
    out = tmp_path / "out"
    with pytest.raises(MergeError) as err:
        merge(_config(method, first, second), out, dry_run=dry_run, quiet=True)
    msg = str(err.value)
    # the first tensor only the 3-layer model has, named with the model that lacks it
    assert f"model '{layered['two']}' has no tensor 'model.layers.2." in msg
    assert f"(present in '{layered['three']}' with shape [" in msg
    n_first = 2 if order[0] == "two" else 3
    assert f"'{first}' has {n_first} layers and '{second}' has {5 - n_first}" in msg
    assert not out.exists()


@pytest.mark.parametrize("order", [("two", "tied"), ("tied", "two")], ids=["untied-first", "tied-first"])
@pytest.mark.parametrize("method", ["linear", "weight_matching", "ties"])
def test_models_with_different_tensor_names_fail(method: str, order: tuple[str, str], layered: dict[str, Path], tmp_path: Path) -> None:
    first, second = layered[order[0]], layered[order[1]]
    with pytest.raises(MergeError, match=rf"model '{layered['tied']}' has no tensor 'lm_head\.weight' \(present in '{layered['two']}'"):
        merge(_config(method, first, second), None, dry_run=True, quiet=True)


def test_cli_dry_run_rejects_different_layer_counts(layered: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump(_config("linear", layered["two"], layered["three"])))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "collab.cli", "merge", str(cfg), str(tmp_path / "out"), "--dry-run"],
        check=False, capture_output=True, text=True, env=env,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "is valid" not in res.stdout
    assert f"{cfg}: model '{layered['two']}' has no tensor 'model.layers.2." in " ".join(res.stderr.split())


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.mark.parametrize("method", ["linear", "regmean"])
def test_unknown_top_level_key_names_file_key_and_allowed(method: str, layered: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(method, layered["two"], layered["two"])
    cfg["base_modle"] = str(layered["two"])
    path = _write(tmp_path, cfg)
    with pytest.raises(MergeError) as err:
        merge(path, None, dry_run=True, quiet=True)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unknown top-level key 'base_modle'; expected one of ")
    for allowed in ("models", "slices", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source", "search"):
        assert allowed in msg.split("expected one of ", 1)[1].split(", ")


def test_unknown_method_names_the_file(layered: dict[str, Path], tmp_path: Path) -> None:
    path = _write(tmp_path, {**_config("linear", layered["two"], layered["two"]), "merge_method": "linaer"})
    with pytest.raises(MergeError, match=rf"^{path}: merge_method: unknown method 'linaer'; expected one of .*\blinear\b"):
        merge(path, None, dry_run=True, quiet=True)


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
@pytest.mark.parametrize("method", ["linear", "weight_matching"])
def test_bad_dtype_names_file_key_and_value(key: str, method: str, layered: dict[str, Path], tmp_path: Path) -> None:
    path = _write(tmp_path, {**_config(method, layered["two"], layered["two"]), key: "float23"})
    with pytest.raises(MergeError, match=rf"^{path}: {key}: expected one of float32, bfloat16, float16, float64, int64 \(optionally prefixed 'torch\.'\), found 'float23'$"):
        merge(path, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("value", ["float32", "torch.float32", "bfloat16", "torch.bfloat16", "float16", "torch.float64", "int64", ""])
def test_dtypes_mergekit_reads_are_accepted(value: str, merge_models: dict[str, Path], tmp_path: Path) -> None:
    """Exactly the names mergekit's ``dtype_from_name`` reads (optionally
    prefixed ``torch.``; empty means unset) pass, normalised without the prefix."""
    from mergekit.common import dtype_from_name

    from merging.config import plan_merge
    from merging.inputs import InputResolver

    path = _write(tmp_path, {**_config("linear", merge_models["ft1"], merge_models["ft2"]), "dtype": value, "out_dtype": value})
    dtype_from_name(value)  # mergekit reads it
    merge(path, None, dry_run=True, quiet=True)
    plan = plan_merge(path, lambda _p: InputResolver(tmp_path, search_dirs=[tmp_path]))
    assert plan.dtype == plan.out_dtype == (value.removeprefix("torch.") or None)


@pytest.mark.parametrize("value", ["TORCH.float32", "float8", "torch.int32", 32])
def test_dtypes_mergekit_rejects_are_rejected(value: Any, layered: dict[str, Path], tmp_path: Path) -> None:
    from mergekit.common import dtype_from_name

    path = _write(tmp_path, {**_config("linear", layered["two"], layered["two"]), "dtype": value})
    with pytest.raises((RuntimeError, AttributeError)):
        dtype_from_name(value)
    with pytest.raises(MergeError, match=rf"^{path}: dtype: expected one of .*, found {value!r}$"):
        merge(path, None, dry_run=True, quiet=True)


def test_a_model_listed_twice_is_named(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """mergekit merges each model once per tensor (it refuses duplicates); the
    error names the model and where it is listed."""
    path = _write(tmp_path, _config("linear", merge_models["ft1"], merge_models["ft1"]))
    with pytest.raises(MergeError, match=rf"^{path}: models: '{merge_models['ft1']}' is listed twice"):
        merge(path, None, dry_run=True, quiet=True)
