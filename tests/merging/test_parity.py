"""`collab merge` equals mergekit's own CLI (`mergekit-yaml`) bit for bit for
every mergekit method, on tiny Llamas, for the same YAML, and runs each of
them on collab's streaming engine (not through mergekit's `run_merge`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.merging.conftest import load_weights, max_abs_diff

SEED = 0


def _m(path: Path, **params: Any) -> dict[str, Any]:
    return {"model": str(path), **({"parameters": params} if params else {})}


def parity_config(method: str, m: dict[str, Path]) -> dict[str, Any]:
    """A representative config for each mergekit method (KeyError for a method
    this table does not know, so a new mergekit method fails the test)."""
    base, ft1, ft2, ft3 = m["base"], m["ft1"], m["ft2"], m["ft3"]
    task = {"models": [_m(base), _m(ft1, weight=0.6, density=0.5), _m(ft2, weight=0.4, density=0.7)], "base_model": str(base)}
    gradient_t = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.5, 0.0]}, {"value": 0.3}]
    table: dict[str, dict[str, Any]] = {
        "linear": {"models": [_m(ft1, weight=0.5), _m(ft2, weight=0.3), _m(ft3, weight=0.2)]},
        "task_arithmetic": task,
        "ties": task,
        "dare_ties": task,
        "dare_linear": task,
        "breadcrumbs": {**task, "parameters": {"gamma": 0.05}},
        "breadcrumbs_ties": {**task, "parameters": {"gamma": 0.05}},
        "della": {**task, "parameters": {"epsilon": 0.1}},
        "della_linear": {**task, "parameters": {"epsilon": 0.1}},
        "slerp": {"models": [_m(base), _m(ft1)], "base_model": str(base), "parameters": {"t": gradient_t}},
        "nuslerp": {"models": [_m(ft1, weight=0.7), _m(ft2, weight=0.3)]},
        "multislerp": {"models": [_m(ft1, weight=0.5), _m(ft2, weight=0.3), _m(ft3, weight=0.2)]},
        "karcher": {"models": [_m(ft1), _m(ft2), _m(ft3)]},
        "model_stock": {"models": [_m(base), _m(ft1), _m(ft2), _m(ft3)], "base_model": str(base)},
        "arcee_fusion": {"models": [_m(base), _m(ft1)], "base_model": str(base)},
        "nearswap": {"models": [_m(base), _m(ft1)], "base_model": str(base), "parameters": {"t": 0.01}},
        "sce": {"models": [_m(base), _m(ft1), _m(ft2), _m(ft3)], "base_model": str(base), "parameters": {"select_topk": 0.5}},
        "ram": {"models": [_m(base), _m(ft1), _m(ft2)], "base_model": str(base)},
        "ramplus_tl": {"models": [_m(base), _m(ft1), _m(ft2)], "base_model": str(base)},
        "passthrough": {
            "slices": [
                {"sources": [{"model": str(ft1), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(ft2), "layer_range": [1, 2]}]},
            ]
        },
    }
    return {**table[method], "merge_method": method, "dtype": "float32"}


def _mergekit_methods() -> list[str]:
    from merging.registry import mergekit_methods

    return sorted(mergekit_methods())


def run_mergekit_cli(config: Path, out: Path, seed: int = SEED) -> None:
    """mergekit's own `mergekit-yaml` command, invoked in-process (same code as
    the console script, without paying its import time per method)."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    res = CliRunner().invoke(main, [str(config), str(out), "--random-seed", str(seed), "--no-write-model-card"], catch_exceptions=False)
    assert res.exit_code == 0, res.output


def test_every_mergekit_method_has_a_parity_config(merge_models: dict[str, Path]) -> None:
    for method in _mergekit_methods():
        parity_config(method, merge_models)  # KeyError names a method without a test


def assert_bit_identical(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    import torch

    assert sorted(ours) == sorted(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))}"
    for k, ours_k in ours.items():
        assert ours_k.dtype == theirs[k].dtype, (k, ours_k.dtype, theirs[k].dtype)
        assert torch.equal(ours_k, theirs[k]), f"{k}: max abs diff {max_abs_diff({k: ours_k}, {k: theirs[k]})}"


@pytest.mark.parametrize("method", _mergekit_methods())
def test_collab_merge_equals_mergekit_cli(method: str, merge_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import merging.mergekit_run
    from merging import merge

    cfg = parity_config(method, merge_models)
    cfg_path = tmp_path / f"{method}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_mergekit_cli(cfg_path, tmp_path / "mergekit")

    def no_fallback(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{method} ran through mergekit's run_merge, not collab's engine")

    monkeypatch.setattr(merging.mergekit_run, "run", no_fallback)
    merge(cfg_path, tmp_path / "collab", seed=SEED, quiet=True)
    ours, theirs = load_weights(tmp_path / "collab"), load_weights(tmp_path / "mergekit")
    assert_bit_identical(ours, theirs)
    # The merge did something: its output differs from every input except where a method may return one input.
    first_input = load_weights(Path(cfg["models"][0]["model"]) if "models" in cfg else merge_models["ft1"])
    if method not in ("passthrough", "nearswap"):
        assert any(k in first_input and not (ours[k] == first_input[k]).all() for k in ours)
