"""The out-of-distribution guard (routers/guard.py, router key 'guarded')."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from routers.base import Router, RouterConfig, RouterError, make_router
from routers.encoders import normalise_rows
from routers.guard import GuardedRouter, candidates, choose, evaluate_candidates, guard_weight
from routers.table import RoutingTable

_MATH = ["add", "multiply", "divide", "subtract", "integral", "equation", "sum", "product"]
_HIST = ["emperor", "war", "dynasty", "revolution", "treaty", "kingdom", "battle", "empire"]
FAR = "zebra xylophone quantum banana"  # no word of the training vocabulary: TF-IDF vector 0


def _table() -> RoutingTable:
    """'mathy' answers the 30 math prompts, 'histy' the 50 history prompts: histy is the best single."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        math = i < 30
        w = rng.choice(_MATH if math else _HIST, 3, replace=False)
        prompt = f"please {w[0]} the {w[1]} and {w[2]} {i}" if math else f"tell me about the {w[0]} {w[1]} {w[2]} {i}"
        rows.append({"id": f"q{i}", "task": "math" if math else "history", "prompt": prompt, "scores": {"mathy": float(math), "histy": float(not math)}, "costs": {"mathy": 1.0, "histy": 1.0}})
    return RoutingTable.from_rows(rows, source="guard-test")


class _AlwaysMathy(Router):
    """A stand-in base router that prefers 'mathy' for every prompt (never the best single)."""

    config_cls = RouterConfig
    uses_encoder = False

    def _fit(self, x, table):  # noqa: ANN001
        pass

    def _predict_features(self, x, prompts):  # noqa: ANN001
        return np.tile([0.9, 0.2], (len(prompts), 1))


def _fixed_guard(table: RoutingTable, base: Router, **kw) -> GuardedRouter:
    cfg = {"encoder": "tfidf", "mode": "hard", "select": False, "statistic": "similarity", "low": 0.1, "high": 0.1, "k": 5} | kw
    g = make_router("guarded", **cfg)
    assert isinstance(g, GuardedRouter)
    g.base = base
    return g.fit(table)


def test_far_query_gets_best_single_near_query_keeps_the_router() -> None:
    t = _table()
    base = _AlwaysMathy()
    base.experts = list(t.experts)
    g = _fixed_guard(t, base)
    near = "please add the sum and integral 3"
    pred, notes = g.explain([near, FAR])
    # Near the math cluster: the base router's prediction, untouched.
    np.testing.assert_allclose(pred[0], [0.9, 0.2])
    assert notes[0]["weight"] == 1.0 and notes[0]["reason"].startswith("in distribution: similarity")
    # Far from everything: exactly the training means, so the choice is the best single (histy, 50 of 80).
    np.testing.assert_allclose(pred[1], [30 / 80, 50 / 80])
    assert t.experts[int(pred[1].argmax())] == "histy"
    assert notes[1]["weight"] == 0.0 and notes[1]["value"] == 0.0
    assert notes[1]["reason"] == f"out of distribution: similarity 0.00 < {notes[1]['low']:.2f}, fell back to best single (histy)"


def test_shrink_is_a_ramp_between_the_thresholds() -> None:
    np.testing.assert_allclose(guard_weight(np.array([0.1, 0.3, 0.5, 0.9]), 0.3, 0.5), [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(guard_weight(np.array([0.35, 0.45]), 0.3, 0.5), [0.25, 0.75])
    np.testing.assert_allclose(guard_weight(np.array([0.29, 0.3]), 0.3, 0.3), [0.0, 1.0])  # hard step
    assert candidates([0.1, 0.3], "hard") == [(0.1, 0.1), (0.3, 0.3)]
    assert candidates([0.1, 0.3], "shrink") == [(0.0, 0.1), (0.0, 0.3), (0.1, 0.3)]


def test_threshold_is_a_quantile_of_the_training_statistic() -> None:
    t = _table()
    tr, te = t.split(0.25, seed=0)
    base = _AlwaysMathy()
    base.experts = list(t.experts)
    g = _fixed_guard(tr, base, low=0.2, high=0.2)
    # Recompute independently: each training prompt's mean cosine to its 5 nearest *other* training prompts.
    x = normalise_rows(g.encoder.encode(tr.prompts))
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    own = np.sort(s, axis=1)[:, -5:].mean(axis=1)
    assert g.thresholds[0] == pytest.approx(np.quantile(own, 0.2), abs=1e-5)


def _with_far_prompts(t: RoutingTable, ids: set[str]) -> RoutingTable:
    """``t`` with the rows ``ids`` turned into far-away prompts whose scores are flipped."""
    rows = [dict(r, prompt=f"{FAR} {r['id']}", scores={e: 1.0 - v for e, v in r["scores"].items()}) if r["id"] in ids else r for r in t.rows()]
    return RoutingTable.from_rows(rows, source="variant")


def test_held_out_rows_play_no_part_in_the_guard(tmp_path: Path) -> None:
    """Trained with --test-size, the guard (its calibration, thresholds and saved tensors)
    is the same whatever the held-out rows say, and changes when training rows change."""
    from safetensors.numpy import load_file

    from routers.api import train_router

    t = _table()
    held_ids = set(t.split(0.25, seed=0)[1].ids)
    opts = {"base": "knn:encoder=tfidf:k=5", "encoder": "tfidf", "k": 5, "folds": 3, "grid_quantiles": [0.05, 0.2]}

    def train(table: RoutingTable, name: str) -> tuple[Router, dict]:
        table.save(tmp_path / f"{name}.jsonl")
        r, held = train_router([str(tmp_path / f"{name}.jsonl")], "guarded", tmp_path / name, dict(opts), test_size=0.25, seed=0)
        assert held is not None and set(held.ids) == held_ids
        return r, load_file(str(tmp_path / name / "router.safetensors"))

    g, tensors = train(t, "orig")
    g_test, tensors_test = train(_with_far_prompts(t, held_ids), "test-changed")
    assert g_test.train_hash == g.train_hash and g_test.meta["guard"] == g.meta["guard"]
    np.testing.assert_array_equal(g_test.thresholds, g.thresholds)
    assert tensors_test.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(tensors_test[k], tensors[k], err_msg=k)
    # The same change to as many training rows moves the guard.
    train_ids = set(sorted(set(t.ids) - held_ids)[: len(held_ids)])
    g_train, tensors_train = train(_with_far_prompts(t, train_ids), "train-changed")
    assert g_train.train_hash != g.train_hash and not np.array_equal(g_train.thresholds, g.thresholds)
    assert tensors_train.keys() != tensors.keys() or any(tensors_train[k].shape != tensors[k].shape or not np.array_equal(tensors_train[k], tensors[k]) for k in tensors)


def test_calibration_uses_training_folds_only_and_roundtrips(tmp_path: Path) -> None:
    t = _table()
    tr, te = t.split(0.25, seed=0)
    g = make_router("guarded", base="knn:encoder=tfidf:k=5", encoder="tfidf", k=5, folds=3, grid_quantiles=[0.05, 0.2]).fit(tr)
    meta = g.meta["guard"]
    assert meta["selected"] and meta["calibrated_with"] == "knn:encoder=tfidf:k=5"
    # Every training row is held out once by a training-task fold and once by an in-distribution fold.
    assert meta["groups"] == {"task_out:history": 38, "task_out:math": 22, "in_dist": 60}
    assert len(meta["grid"]) == 1 + 2 * (2 + 3)  # off + 2 statistics x (2 steps + 3 ramps)
    pred = g.predict(te.prompts + [FAR])
    g.save(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["type"] == "guarded" and cfg["hyperparameters"]["base"] == "knn:encoder=tfidf:k=5"
    assert (tmp_path / "g" / "base" / "config.json").is_file() and not list(tmp_path.rglob("*.pkl"))
    back = Router.load(tmp_path / "g")
    assert isinstance(back, GuardedRouter) and back.config.mode == g.config.mode and back.config.statistic == g.config.statistic
    np.testing.assert_allclose(back.predict(te.prompts + [FAR]), pred, atol=1e-6)
    np.testing.assert_array_equal(back.thresholds, g.thresholds)
    # The minimax objective through fit: its choice is the grid row with the best worst held-out task.
    mm = make_router("guarded", base="knn:encoder=tfidf:k=5", encoder="tfidf", k=5, folds=3, grid_quantiles=[0.05, 0.2], objective="minimax").fit(tr)
    grid = mm.meta["guard"]["grid"]
    assert mm.meta["guard"]["objective"] == "minimax"
    assert grid[0]["worst_task_delta"] >= max(r["worst_task_delta"] for r in grid) - 5e-5  # ranked to 4 decimals
    assert (mm.config.statistic, mm.config.low, mm.config.high) == (grid[0]["statistic"], grid[0]["low"], grid[0]["high"]) or grid[0]["statistic"] == "off"


def _records(low_stat_gain: float) -> list[dict]:
    """Two held-out-task folds and one in-distribution fold: the router gains (or loses)
    ``low_stat_gain`` on prompts with statistic < 0.5 and gains 0.2 on the rest."""
    rng = np.random.default_rng(0)
    recs = []
    for group in ("task_out:a", "task_out:b", "in_dist"):
        n = 400
        # Unseen tasks spread over the whole range of the statistic; in-distribution prompts sit high.
        stat = np.linspace(0.0, 1.0, n) if group != "in_dist" else np.linspace(0.6, 1.0, n)
        low = stat < 0.5
        # experts: 0 = fixed (best on training), 1 = the router's pick
        y = np.zeros((n, 2))
        y[:, 0] = 0.5
        y[:, 1] = np.where(low, 0.5 + low_stat_gain, 0.7) + rng.normal(0, 0.01, n)
        y = np.clip(y, 0, 1)
        pred = np.tile([0.4, 0.6], (n, 1))
        recs.append({"group": group, "y": y, "pred": pred, "means": np.array([0.6, 0.5]), "stats": {"similarity": (stat, np.linspace(0.4, 1.0, 1000))}})
    return recs


def test_selection_guards_only_when_held_out_tasks_lose() -> None:
    cands = candidates([0.05, 0.2, 0.5], "hard")
    # Routing loses 0.3 on the low-similarity half of unseen tasks: a guard is chosen,
    # and the one that falls back on exactly that half (quantile 0.2 of the reference = 0.52).
    best, _ = choose(evaluate_candidates(_records(-0.3), cands), "safe")
    assert best == ("similarity", 0.2, 0.2)
    # Routing helps everywhere: no guard.
    best, _ = choose(evaluate_candidates(_records(+0.1), cands), "safe")
    assert best == ("off", 0.0, 0.0)
    with pytest.raises(RouterError, match="objective"):
        choose(evaluate_candidates(_records(0.1), cands), "worst")


def test_minimax_guards_against_a_small_loss_that_safe_accepts() -> None:
    """Held-out task a loses 0.02 (noisily: not significant) on its low-similarity half, task b
    gains 0.1 there: 'safe' keeps the router (no significant loss, best mean), 'minimax'
    gives up b's gain to bring a's worst case to zero."""
    recs = []
    for group, low_gain, spread in (("task_out:a", -0.02, 0.4), ("task_out:b", 0.1, 0.0), ("in_dist", 0.2, 0.0)):
        n = 400
        stat = np.linspace(0.0, 1.0, n) if group != "in_dist" else np.linspace(0.6, 1.0, n)
        y = np.full((n, 2), 0.5)
        # +-spread on alternate rows: a's mean loss is real but its interval crosses zero
        y[:, 1] = 0.5 + np.where(stat < 0.5, low_gain, 0.0 if group != "in_dist" else 0.2) + spread * (-1.0) ** np.arange(n)
        recs.append({"group": group, "y": y, "pred": np.tile([0.4, 0.6], (n, 1)), "means": np.array([0.6, 0.5]), "stats": {"similarity": (stat, np.linspace(0.4, 1.0, 1000))}})
    grid = evaluate_candidates(recs, candidates([0.05, 0.2, 0.5], "hard"))
    assert choose(grid, "safe")[0] == ("off", 0.0, 0.0)
    best, _ = choose(grid, "minimax")
    assert best == ("similarity", 0.2, 0.2)


def test_ask_and_trace_explain_the_fallback(tmp_path: Path) -> None:
    from routers.api import ask

    t = _table()
    g = make_router("guarded", base="knn:encoder=tfidf:k=5", encoder="tfidf", k=5, mode="hard", select=False, statistic="similarity", low=0.1, high=0.1).fit(t)
    g.save(tmp_path / "g")
    res = ask(tmp_path / "g", FAR)
    assert res["routed_to"] == "histy" and res["guard"]["weight"] == 0.0
    assert res["reason"].startswith("out of distribution: similarity 0.00 < ") and "fell back to best single (histy)" in res["reason"]
    res = ask(tmp_path / "g", "please multiply the product and sum 12")
    assert res["routed_to"] == "mathy" and res["guard"]["weight"] == 1.0 and res["reason"].startswith("highest predicted score")


def test_routed_system_trace_carries_the_guard() -> None:
    from collab.system import BaseSystem, GenerationRequest
    from routers.system import RoutedSystem

    class Echo(BaseSystem):
        def __init__(self, name: str) -> None:
            self.name = name

        def generate(self, request):  # noqa: ANN001
            from collab.system import Completion

            return Completion(text=self.name)

    t = _table()
    base = _AlwaysMathy()
    base.experts = list(t.experts)
    g = _fixed_guard(t, base)
    sys_ = RoutedSystem("auto", g, {"mathy": Echo("mathy"), "histy": Echo("histy")})
    c = sys_.generate(GenerationRequest(prompt=FAR))
    assert c.text == "histy" and c.trace["guard"]["weight"] == 0.0 and c.trace["reason"].startswith("out of distribution")
    c = sys_.generate(GenerationRequest(prompt="please add the sum and integral 3"))
    assert c.text == "mathy" and c.trace["guard"]["weight"] == 1.0


def test_guard_refuses_bad_options() -> None:
    t = _table()
    with pytest.raises(RouterError, match="mode"):
        make_router("guarded", encoder="tfidf", base="knn:encoder=tfidf", mode="sometimes").fit(t)
    with pytest.raises(RouterError, match="cannot guard another guarded"):
        make_router("guarded", encoder="tfidf", base="guarded").fit(t)
