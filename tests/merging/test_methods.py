"""collab's own methods: fisher, regmean, weight_matching and ties_fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from merging import merge
from tests.merging.conftest import load_weights, max_abs_diff

TEXTS = [
    "The capital of France is Paris.",
    "What is 2 + 2? It is 4.",
    "def add(a, b):\n    return a + b",
    "Hello there! How can I help you today?",
    "0 1 2 3 4 5 6 7 8 9 10",
    "Reverse the list [1, 2, 3]: [3, 2, 1].",
]


@pytest.fixture()
def calibration(tmp_path: Path) -> Path:
    p = tmp_path / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return p


def _cfg(method: str, models: list[Path], weights: list[float] | None = None, **params: Any) -> dict[str, Any]:
    ms = [{"model": str(m), **({"parameters": {"weight": w}} if weights else {})} for m, w in zip(models, weights or [1.0] * len(models))]
    return {"models": ms, "merge_method": method, "dtype": "float32", "parameters": params}


def test_fisher_with_equal_fishers_is_linear() -> None:
    from merging.datamerge import fisher_average

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 7, generator=g) for _ in range(3)]
    f = torch.rand(5, 7, generator=g)
    out = fisher_average(ts, [f, f, f], [0.2, 0.3, 0.5], floor=1e-6)
    assert torch.allclose(out, 0.2 * ts[0] + 0.3 * ts[1] + 0.5 * ts[2], atol=1e-6)
    # unequal Fishers pull each entry towards the model that is surer of it
    out2 = fisher_average(ts[:2], [torch.full((5, 7), 1e3), torch.full((5, 7), 1e-3)], [0.5, 0.5], floor=0)
    assert torch.allclose(out2, ts[0], atol=1e-4)


def test_fisher_merge_end_to_end(merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    cfg = _cfg("fisher", [merge_models["ft1"], merge_models["ft2"]], calibration=str(calibration), calibration_samples=4)
    merge(cfg, tmp_path / "out", quiet=True)
    w, a, b = load_weights(tmp_path / "out"), load_weights(merge_models["ft1"]), load_weights(merge_models["ft2"])
    k = "model.layers.0.mlp.up_proj.weight"
    lo, hi = torch.minimum(a[k], b[k]), torch.maximum(a[k], b[k])
    assert bool(((w[k] >= lo - 1e-6) & (w[k] <= hi + 1e-6)).all())  # entrywise convex combination
    assert not torch.allclose(w[k], 0.5 * (a[k] + b[k]), atol=1e-5)  # not a plain average
    assert "Fisher" in (tmp_path / "out" / "README.md").read_text()


def test_regmean_of_identical_models_is_the_model(merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    ft = merge_models["ft1"]
    merge(_cfg("regmean", [ft, ft], calibration=str(calibration)), tmp_path / "out", quiet=True)
    assert max_abs_diff(load_weights(tmp_path / "out"), load_weights(ft)) < 1e-4


def test_regmean_solves_the_regression() -> None:
    """The merged linear layer minimises sum_i ||X_i W^T - X_i W_i^T||^2 (alpha=1)."""
    from merging.datamerge import regmean_linear

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 6, generator=g) for _ in range(2)]
    ws = [torch.randn(4, 6, generator=g) for _ in range(2)]
    merged = regmean_linear(ws, [x.T @ x for x in xs], [1.0, 1.0], alpha=1.0)
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    lstsq = torch.linalg.lstsq(x_all.double(), y_all.double()).solution.T.float()
    assert torch.allclose(merged, lstsq, atol=1e-4)


def test_regmean_end_to_end_differs_from_average(merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    cfg = _cfg("regmean", [merge_models["ft1"], merge_models["ft2"]], calibration=str(calibration), alpha=0.9)
    merge(cfg, tmp_path / "out", quiet=True)
    w, a, b = load_weights(tmp_path / "out"), load_weights(merge_models["ft1"]), load_weights(merge_models["ft2"])
    lin = "model.layers.1.self_attn.o_proj.weight"
    norm = "model.layers.1.input_layernorm.weight"
    assert torch.allclose(w[norm], 0.5 * (a[norm] + b[norm]), atol=1e-6)  # non-linear tensors are averaged
    assert not torch.allclose(w[lin], 0.5 * (a[lin] + b[lin]), atol=1e-4)


def _permuted_copy(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with every layer's MLP units, kv groups and query heads within
    groups permuted: the same function, different weights."""
    import shutil

    from safetensors.torch import save_file

    from merging.rebasin import LayerPerms, apply

    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    sd = load_weights(src)
    g = torch.Generator().manual_seed(seed)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rep = heads // kv
    for layer in range(cfg["num_hidden_layers"]):
        groups = torch.randperm(kv, generator=g)
        q = torch.cat([groups[j] * rep + torch.randperm(rep, generator=g) for j in range(kv)])
        perms = LayerPerms(mlp=torch.randperm(cfg["intermediate_size"], generator=g), q_heads=q, kv_heads=groups)
        for k in list(sd):
            if f".layers.{layer}." in k:
                sd[k] = apply(k, sd[k], perms, cfg).contiguous()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_weight_matching_recovers_a_permuted_copy(merge_models: dict[str, Path], tmp_path: Path) -> None:
    from collab.experts import Expert

    src = merge_models["other1"]
    perm = _permuted_copy(src, tmp_path / "perm", seed=3)
    a, p = load_weights(src), load_weights(perm)
    k = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(a[k], p[k])
    # the permuted copy computes the same function
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    la = Expert.load(src).model(input_ids=ids).logits
    lp = Expert.load(perm).model(input_ids=ids).logits
    assert torch.allclose(la, lp, atol=1e-4)
    merge(_cfg("weight_matching", [src, perm]), tmp_path / "wm", quiet=True)
    assert max_abs_diff(load_weights(tmp_path / "wm"), a) == 0.0
    # a plain average of the two is a different (broken) model
    merge(_cfg("linear", [src, perm], [1.0, 1.0]), tmp_path / "avg", quiet=True)
    assert max_abs_diff(load_weights(tmp_path / "avg"), a) > 0.1


def test_weight_matching_of_independent_models(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """Two models from different seeds: the second is permuted into the first's
    unit order (a permutation, so its function is unchanged), which brings its
    weights closer to the first's, and the merge does not depend on the order in
    which the second model happens to store its units."""
    from transformers import AutoModelForCausalLM

    a_dir, b_dir = merge_models["other1"], merge_models["other2"]
    merge(_cfg("weight_matching", [a_dir, b_dir]), tmp_path / "wm", quiet=True)
    w, a, b = load_weights(tmp_path / "wm"), load_weights(a_dir), load_weights(b_dir)
    aligned = {k: 2 * w[k] - a[k] for k in w}  # equal weights: merged = (a + P(b)) / 2
    ids = torch.tensor([[1, 5, 9, 30, 2, 17, 4]])
    model = AutoModelForCausalLM.from_pretrained(str(b_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.load_state_dict(aligned)
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)
    proj = [k for k in w if ".layers." in k and k.endswith("_proj.weight")]
    moved = sum(float((aligned[k] - a[k]).pow(2).sum()) for k in proj)
    as_stored = sum(float((b[k] - a[k]).pow(2).sum()) for k in proj)
    assert moved < 0.9 * as_stored, (moved, as_stored)
    shuffled = _permuted_copy(b_dir, tmp_path / "shuffled", seed=5)
    merge(_cfg("weight_matching", [a_dir, shuffled]), tmp_path / "wm2", quiet=True)
    assert max_abs_diff(load_weights(tmp_path / "wm2"), w) < 1e-6


def test_ties_fast_equals_ties(merge_models: dict[str, Path], tmp_path: Path) -> None:
    m = merge_models
    models = [{"model": str(m["base"])}] + [
        {"model": str(m[f"ft{i}"]), "parameters": {"weight": w, "density": d}} for i, w, d in ((1, 0.5, 0.3), (2, 0.3, 0.6), (3, 0.2, 0.9))
    ]
    out = {}
    for method in ("ties", "ties_fast"):
        cfg = {"models": models, "base_model": str(m["base"]), "merge_method": method, "dtype": "float32", "parameters": {"rescale": True}}
        merge(cfg, tmp_path / method, quiet=True)
        out[method] = load_weights(tmp_path / method)
    assert max_abs_diff(out["ties"], out["ties_fast"]) <= 1e-6


def test_magnitude_mask_keeps_the_k_largest() -> None:
    from mergekit.sparsify import magnitude

    from merging.fast_ties import magnitude_mask

    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 33, generator=g)
    for density in (0.01, 0.3, 0.5, 0.99):
        keep = magnitude_mask(t, density)
        assert int(keep.sum()) == max(1, int(density * t.numel()))
        assert torch.equal(t * keep, magnitude(t, density))


@pytest.mark.parametrize("kind", ["grid", "greedy", "cmaes"])
def test_search_picks_the_lowest_perplexity_point(kind: str, merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    m = merge_models
    cfg = {
        "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(m["other1"]), "parameters": {"weight": 0.5}}],
        "merge_method": "linear",
        "dtype": "float32",
        "search": {"eval": str(calibration), "samples": 3, "step": 0.5, "budget": 8},
    }
    res = merge(cfg, tmp_path / "out", search=kind, seed=0, quiet=True)
    table = res.search_table
    assert table and len(table) >= 2
    best = min(table, key=lambda r: r["perplexity"])
    ws = best["weights"]
    total = ws[str(m["ft1"])] + ws[str(m["other1"])]
    out = load_weights(tmp_path / "out")
    a, b = load_weights(m["ft1"]), load_weights(m["other1"])
    k = "model.layers.0.mlp.up_proj.weight"
    expect = (ws[str(m["ft1"])] * a[k] + ws[str(m["other1"])] * b[k]) / total
    assert torch.allclose(out[k], expect, atol=1e-5)  # the written model is the best point
    saved = json.loads((tmp_path / "out" / "merge_search.json").read_text())
    assert [r["perplexity"] for r in saved] == [r["perplexity"] for r in table]
    assert "Coefficient search" in (tmp_path / "out" / "README.md").read_text()
    # the best point's perplexity is that of the written model
    from collab.experts import Expert

    e = Expert.load(tmp_path / "out")
    texts = TEXTS[:3]
    n = sum(len(e.tokenizer(t).input_ids) for t in texts)
    import math

    ppl = math.exp(-sum(e.loglikelihood_rolling(t) for t in texts) / n)
    assert abs(ppl - best["perplexity"]) / ppl < 1e-3


def test_search_scored_by_a_collab_benchmark(merge_models: dict[str, Path], tmp_path: Path) -> None:
    m = merge_models
    cfg = {
        "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(m["ft2"]), "parameters": {"weight": 0.5}}],
        "merge_method": "linear",
        "dtype": "float32",
        "search": {"method": "grid", "benchmark": "skill:mixed-dev", "limit": 2, "step": 0.5, "budget": 8},
    }
    res = merge(cfg, tmp_path / "out", seed=0, quiet=True)
    table = res.search_table
    assert table and len(table) == 3  # (0, 1), (0.5, 0.5), (1, 0) on the simplex
    assert all(0.0 <= r["accuracy"] <= 1.0 and "perplexity" not in r for r in table)
    best = max(table, key=lambda r: r["accuracy"])
    assert json.loads((tmp_path / "out" / "merge_search.json").read_text())[table.index(best)]["accuracy"] == best["accuracy"]
    assert "| accuracy |" in (tmp_path / "out" / "README.md").read_text()


def test_search_benchmark_must_exist(merge_models: dict[str, Path], tmp_path: Path) -> None:
    from merging.errors import MergeError

    m = merge_models
    cfg = {
        "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(m["ft2"]), "parameters": {"weight": 0.5}}],
        "merge_method": "linear",
        "search": {"method": "grid", "benchmark": "no-such-bench"},
    }
    with pytest.raises(MergeError, match="search.benchmark"):
        merge(cfg, tmp_path / "out", dry_run=True, quiet=True)


def test_search_with_a_base_model_outside_models(merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    m = merge_models
    cfg = {
        "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(m["ft2"]), "parameters": {"weight": 0.5}}],
        "base_model": str(m["base"]),
        "merge_method": "task_arithmetic",
        "dtype": "float32",
        "search": {"method": "greedy", "eval": str(calibration), "samples": 2},
    }
    res = merge(cfg, tmp_path / "out", seed=0, quiet=True)
    assert res.search_table and len(res.search_table) >= 3


def test_search_per_layer_blocks(merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    """search.layers: one weight per model and layer block; the written merge
    gives each layer its block's weights (mergekit filters), every other tensor
    the mean, and is the model the best point scored."""
    import math

    import yaml

    from collab.experts import Expert

    m = merge_models
    ft1, ft2 = str(m["ft1"]), str(m["other1"])
    cfg = {
        "models": [{"model": ft1, "parameters": {"weight": 0.5}}, {"model": ft2, "parameters": {"weight": 0.5}}],
        "base_model": str(m["base"]),
        "merge_method": "task_arithmetic",
        "dtype": "float32",
        "search": {"method": "cmaes", "layers": 2, "eval": str(calibration), "samples": 3, "budget": 8, "sigma": 0.5},
    }
    res = merge(cfg, tmp_path / "out", seed=0, quiet=True)
    table = res.search_table
    assert table and len(table) == 1 + 8  # the start, then one generation of 8
    labels = [f"{r} layers {i}-{i}" for r in (ft1, ft2) for i in (0, 1)]
    assert all(sorted(row["weights"]) == sorted(labels) for row in table)
    assert set(table[0]["weights"].values()) == {0.5}  # CMA-ES starts from every weight at 1/n
    best = min(table, key=lambda r: r["perplexity"])
    assert best is not table[0]  # on this fixture a sampled point beats the start, so the blocks differ
    w = best["weights"]
    assert len({round(v, 6) for v in w.values()}) == 4  # the blocks really got different weights
    written = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert written["models"][0]["parameters"]["weight"][0] == {"filter": ".layers.0.", "value": w[f"{ft1} layers 0-0"]}
    out, base, a, b = (load_weights(p) for p in (tmp_path / "out", m["base"], m["ft1"], m["other1"]))
    for key, wa, wb in (
        ("model.layers.0.mlp.up_proj.weight", w[f"{ft1} layers 0-0"], w[f"{ft2} layers 0-0"]),
        ("model.layers.1.self_attn.q_proj.weight", w[f"{ft1} layers 1-1"], w[f"{ft2} layers 1-1"]),
        ("model.embed_tokens.weight", (w[f"{ft1} layers 0-0"] + w[f"{ft1} layers 1-1"]) / 2, (w[f"{ft2} layers 0-0"] + w[f"{ft2} layers 1-1"]) / 2),
    ):
        expect = base[key] + wa * (a[key] - base[key]) + wb * (b[key] - base[key])
        assert torch.allclose(out[key], expect, atol=1e-5), key
    e = Expert.load(tmp_path / "out")
    texts = TEXTS[:3]
    n = sum(len(e.tokenizer(t).input_ids) for t in texts)
    ppl = math.exp(-sum(e.loglikelihood_rolling(t) for t in texts) / n)
    assert abs(ppl - best["perplexity"]) / ppl < 1e-3


@pytest.mark.parametrize(
    "search, message",
    [
        ({"method": "grid", "layers": 2}, "cmaes"),
        ({"method": "cmaes", "layers": 0}, "positive whole number"),
        ({"method": "cmaes", "layers": 4, "budget": 9}, "less than one generation"),
    ],
)
def test_search_layers_errors(search: dict, message: str, merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    from merging.errors import MergeError

    m = merge_models
    cfg = {
        "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(m["ft2"]), "parameters": {"weight": 0.5}}],
        "merge_method": "linear",
        "search": {"eval": str(calibration), **search},
    }
    with pytest.raises(MergeError, match=message):
        merge(cfg, tmp_path / "out", dry_run=True, quiet=True)


def test_search_more_layer_blocks_than_layers(merge_models: dict[str, Path], calibration: Path, tmp_path: Path) -> None:
    from merging.errors import MergeError

    m = merge_models
    cfg = {
        "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(m["ft2"]), "parameters": {"weight": 0.5}}],
        "merge_method": "linear",
        "search": {"method": "cmaes", "layers": 3, "budget": 20, "eval": str(calibration), "samples": 2},
    }
    with pytest.raises(MergeError, match="3 blocks asked for, but the models have 2 decoder layers"):
        merge(cfg, tmp_path / "out", quiet=True)
