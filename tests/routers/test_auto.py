"""--router auto (shift-simulating selection), the best-expert classifier and prior adaptation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from collab.cli import app
from routers.adapt import AdaptedRouter, TiltCalibration, adapt, adjust, em_priors, fit_tilt, read_prompts, tilt_adjust, tilt_apply, tilt_choose, tilt_estimate, tilt_routing_gain
from routers.auto import (
    ShiftProtocol,
    best_expert_labels,
    gap_closed,
    grouped_folds,
    near_duplicate_groups,
    select_router,
    task_delta,
    tilted_mixes,
)
from routers.base import Router, RouterError, make_router
from routers.table import RoutingTable

runner = CliRunner()

# Candidates on TF-IDF only, so these tests need no MiniLM.
TFIDF_CANDIDATES = (
    ("classifier", "classifier", {"encoder": "tfidf", "hidden": (16,)}),
    ("knn", "knn", {"encoder": "tfidf", "k": 10}),
    ("best-single", "best-single", {}),
)
TFIDF_PROTOCOL = ShiftProtocol(folds=3, dup_encoder="tfidf")


def test_best_expert_labels_break_ties_toward_the_best_mean() -> None:
    # expert means: a 0.25, b 0.75, c 0.5 -> ties go to b, then c, then a
    s = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.5]])
    s[1] = [0.0, 0.0, 0.0]
    assert list(best_expert_labels(s)) == [1, 1, 1, 1, 1, 2]
    assert list(best_expert_labels(s, "first")) == [0, 0, 1, 1, 1, 2]
    with pytest.raises(RouterError, match="ties: expected 'best-mean' or 'first', found 'x'"):
        best_expert_labels(s, "x")


def test_classifier_router_routes_and_round_trips(synth_table: RoutingTable, tmp_path: Path) -> None:
    tr, te = synth_table.split(0.25, 0)
    r = make_router("classifier", encoder="tfidf", hidden=[32]).fit(tr)
    p = r.predict(te.prompts)
    assert p.shape == (len(te), 2) and np.allclose(p.sum(axis=1), 1.0)
    routed = te.scores[np.arange(len(te)), p.argmax(1)].mean()
    assert routed > te.scores.mean(0).max() + 0.1
    assert abs(sum(r.meta["label_priors"]) - 1.0) < 1e-9
    r.save(tmp_path / "c")
    back = Router.load(tmp_path / "c")
    assert back.key == "classifier" and back.config.hidden == (32,)
    np.testing.assert_allclose(back.predict(te.prompts), p, atol=1e-6)


def test_near_duplicates_stay_on_one_side_of_every_fold() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 8))
    x = np.concatenate([base, base[:10] + 1e-3 * rng.normal(size=(10, 8))])  # rows 30-39 duplicate 0-9
    g = near_duplicate_groups(x, 0.99)
    assert len(set(g)) == 30 and all(g[i] == g[30 + i] for i in range(10))
    tasks = ["a"] * 20 + ["b"] * 10 + ["a"] * 10
    folds = grouped_folds(tasks, g, 3, seed=0)
    assert len(folds) == 3
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen) == list(range(40))
    for tr, va in folds:
        assert not set(g[tr]) & set(g[va])


def test_tilted_mixes_give_each_task_half_the_weight() -> None:
    tasks = ["a"] * 6 + ["b"] * 3 + ["c"] * 1
    mixes = dict(tilted_mixes(tasks))
    t = np.asarray(tasks)
    for name, w in mixes.items():
        assert w[t == name].sum() / w.sum() == pytest.approx(0.5)
    # the other tasks keep their proportions: under the 'c' mix, a:b = 6:3
    w = mixes["c"]
    assert w[t == "a"].sum() / w[t == "b"].sum() == pytest.approx(2.0)
    assert tilted_mixes(["a", "a"]) == []


def test_gap_closed_under_weights() -> None:
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert gap_closed(scores.max(1), scores) == pytest.approx(1.0)
    assert gap_closed(scores[:, 0], scores) == pytest.approx(0.0)
    # weighting row 1 up makes expert b the best single: routing to a everywhere is then below it
    assert gap_closed(scores[:, 0], scores, np.array([1, 5, 1, 1])) < 0


def test_select_router_records_the_protocol_and_picks_the_best_score(synth_table: RoutingTable, tmp_path: Path) -> None:
    r = select_router(synth_table, seed=0, candidates=TFIDF_CANDIDATES, protocol=TFIDF_PROTOCOL)
    a = r.meta["auto"]
    assert [c["name"] for c in a["candidates"]] == ["classifier", "knn", "best-single"]
    best = max(a["candidates"], key=lambda c: c["score"])
    assert a["chosen"] == best["name"] and r.key == best["key"]
    for c in a["candidates"]:
        assert {"grouped", "reweighted", "reweighted_worst", "loto", "score", "loto_per_task", "loto_worst_upper"} <= set(c)
        assert c["loto_worst_upper"] == min(t["upper"] for t in c["loto_per_task"].values())
        assert c["score"] == pytest.approx(np.mean([c["grouped"], c["reweighted"], c["loto"]]))
    bs = next(c for c in a["candidates"] if c["name"] == "best-single")
    assert bs["grouped"] == pytest.approx(0.0) and bs["loto"] == pytest.approx(0.0)
    assert best["score"] > 0.3  # the synthetic table's experts are told apart by their words
    assert a["protocol"]["folds"] == 3 and "criterion" in a["protocol"]
    r.save(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["meta"]["auto"]["chosen"] == a["chosen"]


def test_task_delta_is_a_paired_mean_with_its_upper_bound() -> None:
    routed, fixed = np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0, 0.0])
    d = task_delta(routed, fixed)
    diff = routed - fixed
    assert d["delta"] == pytest.approx(0.0) and d["n"] == 4
    assert d["upper"] == pytest.approx(1.96 * diff.std(ddof=1) / 2)
    assert task_delta(np.zeros(50), np.ones(50))["upper"] == pytest.approx(-1.0)


def test_auto_refuses_options(synth_path: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["route", "train", "--data", str(synth_path), "--out", str(tmp_path / "r"), "-o", "k=3"])
    assert r.exit_code != 0
    assert "--router auto: takes no -o options (found 'k')" in str(r.exception) + r.output


# ------------------------------------------------------------ prior adaptation
def _binary_posteriors(x: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Exact P(y_j = 1 | x_j) for x_j ~ N(+1, 1) if y_j = 1 else N(-1, 1), under ``prior``."""
    lr = np.exp(2.0 * x)  # N(x; 1, 1) / N(x; -1, 1)
    return prior * lr / (prior * lr + (1 - prior))


def test_em_recovers_known_priors_on_a_synthetic_shift() -> None:
    rng = np.random.default_rng(0)
    train_pri = np.array([0.7, 0.4, 0.2])
    true_new = np.array([0.3, 0.6, 0.25])
    n = 6000
    y = rng.random((n, 3)) < true_new  # the new traffic's labels, never shown to the EM
    x = np.where(y, 1.0, -1.0) + rng.normal(size=(n, 3))
    pred = _binary_posteriors(x, train_pri)  # a calibrated router trained under train_pri
    new, adjusted, iters = em_priors(pred, train_pri, "binary")
    assert np.abs(new - true_new).max() < 0.03, new
    assert iters > 1
    # the adjusted posteriors are the exact ones under the true priors, up to the estimate's error
    np.testing.assert_allclose(adjusted, _binary_posteriors(x, new), atol=1e-3)  # posteriors are clipped to [1e-4, 1 - 1e-4]
    # MAP: training priors worth as many observations as the new prompts pull the estimate about halfway back
    half, _, _ = em_priors(pred, train_pri, "binary", strength=n)
    ratio = (half - train_pri) / (new - train_pri)
    assert np.all((ratio > 0.3) & (ratio < 0.7)), ratio
    # no shift: the estimate stays at the training priors
    y0 = rng.random((n, 3)) < train_pri
    x0 = np.where(y0, 1.0, -1.0) + rng.normal(size=(n, 3))
    same, _, _ = em_priors(_binary_posteriors(x0, train_pri), train_pri)
    assert np.abs(same - train_pri).max() < 0.03


def test_em_recovers_multiclass_priors() -> None:
    rng = np.random.default_rng(1)
    means = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    train_pri, true_new = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.3, 0.5])
    n = 6000
    c = rng.choice(3, size=n, p=true_new)
    x = means[c] + rng.normal(size=(n, 2))
    lik = np.exp(-0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1))  # (n, 3)
    post = lik * train_pri / (lik * train_pri).sum(1, keepdims=True)
    new, adj, _ = em_priors(post, train_pri, "multiclass")
    assert np.abs(new - true_new).max() < 0.03, new
    np.testing.assert_allclose(adj.sum(1), 1.0)
    # with the true priors the choice is Bayes-optimal under the shift: better than before
    assert (adj.argmax(1) == c).mean() > (post.argmax(1) == c).mean()


def _topic_world(n: int, rng: np.random.Generator, topic_weights: np.ndarray | None = None, tilt: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topic (n,), correctness y (n, 3), exact P(y_j = 1 | topic, x_j) (n, 3)) for three experts
    whose rates depend on one of four topics (topics 0 and 1 alike); x_j ~ N(+-1, 1) by y_j.
    ``topic_weights`` reweights the topics (a change of prompt mix), ``tilt`` reweights by
    exp(tilt . y) (label shift): both by rejection-free resampling of a larger draw."""
    rates = np.array([[0.8, 0.3, 0.5], [0.8, 0.3, 0.5], [0.2, 0.7, 0.5], [0.5, 0.5, 0.9]])
    m = 4 * n
    t = rng.integers(0, 4, size=m)
    y = (rng.random((m, 3)) < rates[t]).astype(np.float64)
    w = np.ones(m) if topic_weights is None else np.asarray(topic_weights, dtype=np.float64)[t]
    if tilt is not None:
        w = w * np.exp(y @ tilt)
    keep = rng.choice(m, size=n, p=w / w.sum())
    t, y = t[keep], y[keep]
    x = np.where(y > 0, 1.0, -1.0) + rng.normal(size=y.shape)
    lr = np.exp(2.0 * x)
    post = rates[t] * lr / (rates[t] * lr + 1 - rates[t])
    return t, y, post


def test_tilt_recovers_a_known_label_shift_on_correlated_experts() -> None:
    rng = np.random.default_rng(3)
    t, y, post = _topic_world(20000, rng)
    theta = np.array([-1.0, 0.6, 0.0])
    t2, y2, post2 = _topic_world(20000, rng, tilt=theta)
    est, j_fit, j_zero = fit_tilt(post2, post, y, ridge=0.0)
    assert np.abs(est - theta).max() < 0.15, est
    w = np.exp(y @ est)
    np.testing.assert_allclose((w / w.sum()) @ y, y2.mean(0), atol=0.015)  # the new rates, from no labels
    assert j_zero > 100 * max(j_fit, 1.0)
    # the adjustment is the exact posterior under the tilted traffic (x_j depends on y_j only)
    np.testing.assert_allclose(tilt_adjust(post[:5], theta), (lambda o: o / (1 + o))(post[:5] / (1 - post[:5]) * np.exp(theta)), atol=1e-9)


def _calibration(t: np.ndarray, y: np.ndarray, post: np.ndarray) -> TiltCalibration:
    return TiltCalibration(oof=post, y=y, shape=np.eye(4)[t], centroids=np.eye(4), basis=np.zeros((4, 0)), centre=np.zeros(4), encoder=None, folds=5)


def test_tilt_applies_to_label_shift_and_leaves_a_change_of_mix_and_no_shift_alone() -> None:
    rng = np.random.default_rng(4)
    cal = _calibration(*_topic_world(8000, rng))
    t, _, post = _topic_world(1000, rng, tilt=np.array([-1.0, 0.8, 0.0]))
    est = tilt_estimate(post, np.eye(4)[t], cal)
    assert est["applied"] and "label shift" in est["reason"], est["reason"]
    assert est["theta"][0] < -0.5 and est["theta"][1] > 0.4
    assert est["routing_gain"] > est["routing_gain_se"] > 0  # the adjusted predictions route the reweighted rows better
    # the same traffic with a routing gain demanded beyond reach: both moment tests pass, the third refuses
    strict = tilt_estimate(post, np.eye(4)[t], cal, min_gain=1e6)
    assert strict["j_shape"] < strict["j_shape_limit"] and strict["j_gain"] > strict["j_gain_limit"]
    assert not strict["applied"] and "would not route the training rows" in strict["reason"], strict["reason"]
    assert strict["passed"] == {"shape": True, "shift": True, "routing": False}
    # topic 0 four times as common: rates move too (expert 0 up), but topics 0 and 1 are alike in
    # every rate, so no reweighting of correctness can make one more common than the other
    t, y, post = _topic_world(1000, rng, topic_weights=np.array([4.0, 1.0, 1.0, 1.0]))
    assert y[:, 0].mean() > cal.y[:, 0].mean() + 0.05
    est = tilt_estimate(post, np.eye(4)[t], cal)
    assert not est["applied"] and est["j_shape"] >= est["j_shape_limit"] and "change of prompt mix" in est["reason"], est
    t, _, post = _topic_world(1000, rng)
    est = tilt_estimate(post, np.eye(4)[t], cal)
    assert not est["applied"] and "no significant change" in est["reason"], est


def test_one_expert_model_finds_the_expert_that_moved_and_hands_other_shifts_to_the_free_tilt() -> None:
    cal = _calibration(*_topic_world(8000, np.random.default_rng(4)))
    pri = cal.y.mean(0)
    # expert 1 right more often (theta = (0, 1, 0)): found, with the new rates, and applied
    t, y, post = _topic_world(1000, np.random.default_rng(11), tilt=np.array([0.0, 1.0, 0.0]))
    ch = tilt_choose(post, np.eye(4)[t], cal, pri)
    one = ch["one"]
    assert ch["model"] == "one expert" and ch["free"] is None and one["expert"] == 1, ch["reason"]
    assert one["passed"] == {"shift": True, "selection": True, "shape": True, "routing": True}
    assert one["j_common"] - one["j_fit"] > one["j_gain_limit"] and one["j_runner_up"] - one["j_fit"] > 50
    np.testing.assert_allclose(one["priors"], y.mean(0), atol=0.04)  # the new rates, from no labels
    assert one["priors"][1] > pri[1] + 0.15 and one["routing_gain"] > one["routing_gain_se"] > 0
    np.testing.assert_allclose(tilt_apply(post, ch, pri), adjust(post, pri, one["priors"]), atol=1e-12)
    assert ch["reason"].startswith("expert 1's rate moved against the others' (fit gain")
    named = tilt_choose(post, np.eye(4)[t], cal, pri, experts=["a", "b", "c"])
    assert named["reason"].startswith("b's rate moved against the others'")
    # two experts moved: the one-expert model fails its shape test, the free tilt takes it
    t, _, post = _topic_world(1000, np.random.default_rng(20), tilt=np.array([-1.0, 0.8, 0.0]))
    ch = tilt_choose(post, np.eye(4)[t], cal, pri)
    assert ch["model"] == "free" and ch["one"]["passed"]["shape"] is False and ch["free"]["applied"], ch["reason"]
    np.testing.assert_allclose(tilt_apply(post, ch, pri), tilt_adjust(post, ch["theta"]), atol=1e-12)
    assert ch["reason"].startswith(f"one expert: the new prompts' shape is not what a change of expert {ch['one']['expert']}'s rate predicts")
    # a change of mix: neither applies; no shift: the one-expert model finds none
    t, _, post = _topic_world(1000, np.random.default_rng(20), topic_weights=np.array([4.0, 1.0, 1.0, 1.0]))
    ch = tilt_choose(post, np.eye(4)[t], cal, pri)
    assert ch["model"] is None and not ch["applied"] and ch["one"]["passed"]["shape"] is False
    np.testing.assert_array_equal(tilt_apply(post, ch, pri), post)
    t, _, post = _topic_world(1000, np.random.default_rng(20))
    ch = tilt_choose(post, np.eye(4)[t], cal, pri)
    assert ch["model"] is None and "no one expert's rate moved against the others" in ch["one"]["reason"]
    # without the one-expert model the choice is the free tilt's alone
    t, _, post = _topic_world(1000, np.random.default_rng(11), tilt=np.array([0.0, 1.0, 0.0]))
    free_only = tilt_choose(post, np.eye(4)[t], cal, pri, one_expert=False)
    assert free_only["one"] is None and free_only["model"] == "free" and free_only["free"]["passed"] == {"shape": True, "shift": True, "routing": True}
    assert abs(free_only["theta"][1] - 1.0) < 0.15 and np.abs(free_only["theta"][[0, 2]]).max() < 0.15
    np.testing.assert_allclose(tilt_apply(post, free_only, pri), tilt_adjust(post, free_only["theta"]), atol=1e-12)


def test_tilt_routing_gain_weights_each_rows_change_of_choice_by_the_tilt() -> None:
    oof = np.array([[0.6, 0.5], [0.4, 0.5], [0.9, 0.1], [0.5, 0.55]])
    y = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    cal = TiltCalibration(oof=oof, y=y, shape=np.zeros((4, 1)), centroids=np.zeros((2, 1)), basis=np.zeros((1, 0)), centre=np.zeros(1), encoder=None, folds=2)
    # theta = (0, 1): only row 0 changes choice (expert 0 -> 1, where it is right); its weight is e / (e + 3)
    gain, se = tilt_routing_gain(cal, np.array([0.0, 1.0]))
    w = np.array([np.e, 1.0, 1.0, 1.0]) / (np.e + 3)
    d = np.array([1.0, 0.0, 0.0, 0.0])
    assert gain == pytest.approx(w[0])
    assert se == pytest.approx(np.sqrt(((w * (d - w[0])) ** 2).sum()))
    assert tilt_routing_gain(cal, np.full(2, 0.7)) == (0.0, 0.0)  # a uniform tilt changes no choice


def test_adjust_is_identity_at_the_training_priors() -> None:
    p = np.array([[0.2, 0.9], [0.6, 0.5]])
    np.testing.assert_allclose(adjust(p, np.array([0.3, 0.7]), np.array([0.3, 0.7])), p, atol=1e-9)


def test_read_prompts_errors(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(RouterError, match=r"p.jsonl: line 3: field 'prompt': expected a non-empty string, found \['text'\]"):
        read_prompts(f)
    f.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(RouterError, match="line 2: not valid JSON"):
        read_prompts(f)
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "scores": {}}\n')
    assert read_prompts(f) == ["a", "b"]


def _shifted_rows(rows: list[dict], task: str, repeat: int) -> list[dict]:
    """The rows of ``task`` repeated (new ids): traffic whose mix moved toward it."""
    out = list(rows)
    for k in range(repeat):
        out += [r | {"id": f"{r['id']}-{k}"} for r in rows if r["task"] == task]
    return out


def test_route_adapt_cli_moves_priors_toward_the_new_mix(synth_path: Path, synth_table: RoutingTable, tmp_path: Path) -> None:
    r = runner.invoke(app, ["route", "train", "--data", str(synth_path), "--router", "knn", "-o", "encoder=tfidf", "-o", "k=10", "--out", str(tmp_path / "r"), "--test-size", "0.25"])
    assert r.exit_code == 0, r.output
    # new traffic: history prompts only, where histy is right far more often than on the training mix
    prompts = tmp_path / "new.jsonl"
    hist = [p for p, t in zip(synth_table.prompts, synth_table.tasks) if t == "history"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in hist))
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "predictions adjusted" in r.output
    # trained from a file, which the router records by name and hash only: the EM, and a hint toward --data
    assert "the per-expert EM: the router's training table was not at hand" in r.output
    ar = Router.load(tmp_path / "a")
    assert isinstance(ar, AdaptedRouter) and ar.applied and ar.base is not None and ar.base.key == "knn"
    assert "calibration" not in ar.meta["adapted"]
    pri = ar.meta["adapted"]["priors"]
    # history only: histy is right more often, mathy less, than on the training mix
    assert pri["histy"]["new"] > pri["histy"]["train"] + 0.1
    assert pri["mathy"]["new"] < pri["mathy"]["train"] - 0.1
    assert ar.config.strength == 120  # the training queries, by default
    assert pri["histy"]["train"] == pytest.approx(float(np.mean(json.loads((tmp_path / "r" / "config.json").read_text())["meta"]["train_mean_scores"][1])))
    assert (tmp_path / "a" / "heldout_ids.txt").read_text() == (tmp_path / "r" / "heldout_ids.txt").read_text()
    r = runner.invoke(app, ["route", "eval", "--router", str(tmp_path / "a"), "--data", str(synth_path)])
    assert r.exit_code == 0, r.output
    assert "adapted (MAP-EM re-estimation" in r.output and "histy" in r.output
    r = runner.invoke(app, ["route", "eval", "--router", str(tmp_path / "a"), "--data", str(synth_path), "--json"])
    d = json.loads(r.output)
    assert d["router"] == "adapted" and d["queries"] == 40 and d["adapted"]["applied"] is True
    # adapting an adapted router is refused, naming where its base is
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "a"), "--prompts", str(prompts), "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "already an adapted router" in str(r.exception) + r.output


def test_route_adapt_cli_tilt_against_the_training_table(synth_path: Path, synth_table: RoutingTable, tmp_path: Path) -> None:
    import torch  # noqa: F401  (as with MiniLM: a few prompts' similarities then run in torch, which refused mixed float widths)

    r = runner.invoke(app, ["route", "train", "--data", str(synth_path), "--router", "knn", "-o", "encoder=tfidf", "-o", "k=10", "--out", str(tmp_path / "r"), "--test-size", "0.25"])
    assert r.exit_code == 0, r.output
    small = ["--method", "tilt", "--encoder", "tfidf", "--clusters", "4", "--components", "4", "--folds", "3"]
    # new traffic: the history prompts only, a change of prompt mix (rejected as label shift here)
    prompts = tmp_path / "new.jsonl"
    hist = [p for p, t in zip(synth_table.prompts, synth_table.tasks) if t == "history"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in hist))
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "a"), "--data", str(synth_path), *small])
    assert r.exit_code == 0, r.output
    assert "(tilt, 3 refits, 4 cells)" in r.output
    ar = Router.load(tmp_path / "a")
    assert isinstance(ar, AdaptedRouter) and ar.config.mode == "tilt"
    a = ar.meta["adapted"]
    assert a["folds"] == 3 and a["clusters"] == 4 and a["components"] == 4 and set(a["tests"]) == {"j_shape", "j_shape_limit", "j_gain", "j_gain_limit", "routing_gain", "routing_gain_se"} and a["min_gain"] == 1.0
    assert a["applied"] == (a["tests"]["j_shape"] < a["tests"]["j_shape_limit"] and a["tests"]["j_gain"] > a["tests"]["j_gain_limit"] and a["tests"]["routing_gain"] > a["tests"]["routing_gain_se"])
    assert not a["applied"] and "a change of prompt mix" in a["reason"] and "(not applied)" in r.output
    # the one-expert model was tried first and is recorded with its four tests
    o = a["one_expert"]
    assert a["model"] is None and o["applied"] is False and set(o["passed"]) == {"shift", "selection", "shape", "routing"} and o["expert"] in ar.experts
    assert set(o["tests"]) == {"j_common", "j_fit", "j_runner_up", "j_gain_limit", "j_margin_limit", "j_shape", "j_shape_limit", "routing_gain", "routing_gain_se"}
    assert a["reason"].startswith("one expert: ") and "; free tilt: " in a["reason"]
    # the saved router predicts what its recorded tilt says
    theta = np.array([a["priors"][e]["theta"] for e in ar.experts])
    base = Router.load(tmp_path / "r")
    want = tilt_adjust(base.predict(hist[:5]), theta) if a["applied"] else base.predict(hist[:5])
    np.testing.assert_allclose(ar.predict(hist[:5]), want, atol=1e-9)
    # errors name the problem
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "b"), "--method", "tilt"])
    assert r.exit_code != 0 and "--method tilt: needs the router's training table (--data TABLE)" in str(r.exception) + r.output
    assert f"records '{synth_path.name}' (files by name and SHA-256 only" in str(r.exception) + r.output
    assert a["calibration"] == {"tables": [synth_path.name], "from": "--data"}
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "b"), "--data", str(synth_path), "--method", "em"])
    assert r.exit_code != 0 and "--data: only --method tilt uses the training table" in str(r.exception) + r.output
    # with --data and no --method, the method is tilt
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "t"), "--data", str(synth_path), *small[2:]])
    assert r.exit_code == 0 and "(tilt, 3 refits, 4 cells)" in r.output, r.output
    assert Router.load(tmp_path / "t").config.mode == "tilt"
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "f"), "--data", str(synth_path), "--no-one-expert", *small[2:]])
    assert r.exit_code == 0, r.output
    f = Router.load(tmp_path / "f").meta["adapted"]
    assert f["one_expert"] is None and f["reason"] == a["reason"].split("; free tilt: ", 1)[1]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "task": "t", "prompt": f"an unrelated prompt {i}", "scores": {"mathy": 1.0, "histy": 0.0}}) + "\n" for i in range(40)))
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "b"), "--data", str(other), *small])
    assert r.exit_code != 0 and "none of the 40 rows" in str(r.exception) + r.output and "--data must be its training table" in str(r.exception) + r.output
    r = runner.invoke(app, ["route", "train", "--data", str(synth_path), "--router", "classifier", "-o", "encoder=tfidf", "-o", "hidden=8", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "c"), "--prompts", str(prompts), "--out", str(tmp_path / "b"), "--data", str(synth_path), *small])
    assert r.exit_code != 0 and "predicts P(best expert), adapt it with --method em" in str(r.exception) + r.output


def test_route_adapt_cli_uses_the_recorded_shorthand_table(synth_table: RoutingTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A router trained on a shorthand table (llmrouter, ...) records it by name, so the plain
    `route adapt --router --prompts --out` calibrates the tilt on it without --data."""
    import torch  # noqa: F401  (as in the test above)

    from routers.table import SHORTHANDS

    monkeypatch.setitem(SHORTHANDS, "synth-shorthand", lambda: synth_table)
    r = runner.invoke(app, ["route", "train", "--data", "synth-shorthand", "--router", "knn", "-o", "encoder=tfidf", "-o", "k=10", "--out", str(tmp_path / "r"), "--test-size", "0.25"])
    assert r.exit_code == 0, r.output
    prompts = tmp_path / "new.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, t in zip(synth_table.prompts, synth_table.tasks) if t == "history"))
    small = ["--encoder", "tfidf", "--clusters", "4", "--components", "4", "--folds", "3"]
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "a"), *small])
    assert r.exit_code == 0, r.output
    assert "(tilt, 3 refits, 4 cells; calibrated on synth-shorthand, the training table the router records)" in r.output
    ar = Router.load(tmp_path / "a")
    assert ar.config.mode == "tilt" and ar.meta["adapted"]["calibration"] == {"tables": ["synth-shorthand"], "from": "recorded"}
    assert ar.meta["adapted"]["folds"] == 3
    # --method em still chooses the EM
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "e"), "--method", "em"])
    assert r.exit_code == 0 and "EM iterations" in r.output, r.output
    assert Router.load(tmp_path / "e").config.mode == "binary"
    # the shorthand no longer holds the router's prompts: a clear error, with both ways out
    other = RoutingTable(ids=[f"o{i}" for i in range(8)], prompts=[f"an unrelated prompt {i}" for i in range(8)], experts=synth_table.experts, scores=np.zeros((8, len(synth_table.experts))), costs=np.ones((8, len(synth_table.experts))), tasks=["t"] * 8)
    monkeypatch.setitem(SHORTHANDS, "synth-shorthand", lambda: other)
    r = runner.invoke(app, ["route", "adapt", "--router", str(tmp_path / "r"), "--prompts", str(prompts), "--out", str(tmp_path / "b"), *small])
    assert r.exit_code != 0
    assert "its recorded training table synth-shorthand is a prompt it was trained on (the table changed since); pass its training table with --data, or --method em" in str(r.exception) + r.output


def test_adapted_router_in_a_spec_routes_like_its_predictions(synth_table: RoutingTable, tmp_path: Path) -> None:
    from collab.system import GenerationRequest
    from routers.system import RoutedSystem

    base = make_router("knn", encoder="tfidf", k=10).fit(synth_table)
    base.meta["train_mean_scores"] = [float(v) for v in synth_table.scores.mean(0)]
    hist = [p for p, t in zip(synth_table.prompts, synth_table.tasks) if t == "history"]
    ar = adapt(base, hist, min_change=0.0)
    ar.save(tmp_path / "a")
    back = Router.load(tmp_path / "a")
    np.testing.assert_allclose(back.predict(hist[:5]), ar.predict(hist[:5]))
    sysm = RoutedSystem("a", back, None)
    e = sysm.explain(GenerationRequest(prompt=hist[0]))
    assert e["routed_to"] == back.experts[int(back.predict([hist[0]])[0].argmax())]
    assert e["scores"]["histy"] == pytest.approx(float(back.predict([hist[0]])[0][back.experts.index("histy")]))


def test_route_train_defaults_to_auto(synth_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import routers.auto as auto

    monkeypatch.setattr(auto, "CANDIDATES", TFIDF_CANDIDATES)
    orig = auto.select_router
    monkeypatch.setattr(auto, "select_router", lambda table, seed=0, log=None: orig(table, seed, TFIDF_CANDIDATES, TFIDF_PROTOCOL, log))
    out = tmp_path / "r"
    r = runner.invoke(app, ["route", "train", "--data", str(synth_path), "--out", str(out), "--test-size", "0.25"])
    assert r.exit_code == 0, r.output
    assert "auto: chose" in r.output and "under simulated shift" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["meta"]["auto"]["protocol"]["queries"] == 120  # the training part only
    r = runner.invoke(app, ["route", "eval", "--router", str(out), "--data", str(synth_path)])
    assert r.exit_code == 0, r.output
    assert "chosen by --router auto" in r.output and "leave-one-task-out" in r.output


def test_spec_route_system_uses_an_adapted_router(tmp_path: Path, tiny_model_dir: Path) -> None:
    from collab.spec import load_spec
    from collab.system import GenerationRequest
    from tests.routers.conftest import synthetic_rows

    rows = [r | {"scores": {"a": r["scores"]["mathy"], "b": r["scores"]["histy"]}, "costs": {"a": 1.0, "b": 4.0}} for r in synthetic_rows()]
    table = RoutingTable.from_rows(rows, source="synthetic")
    base = make_router("knn", encoder="tfidf", k=10).fit(table)
    base.meta["train_mean_scores"] = [float(v) for v in table.scores.mean(0)]
    hist = [p for p, t in zip(table.prompts, table.tasks) if t == "history"]
    adapt(base, hist, min_change=0.0).save(tmp_path / "adapted")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(f"experts:\n  a: {{ref: {tiny_model_dir}}}\n  b: {{ref: {tiny_model_dir}}}\nsystems:\n  auto: {{type: route, router: {tmp_path / 'adapted'}, experts: [a, b]}}\n")
    sys_ = load_spec(spec_path).system("auto")
    assert isinstance(sys_.router, AdaptedRouter) and sys_.router.applied
    want = sys_.router.predict([hist[0]])[0]
    e = sys_.explain(GenerationRequest(prompt=hist[0]))
    assert e["routed_to"] == ["a", "b"][int(want.argmax())]
    assert e["scores"]["b"] == pytest.approx(float(want[1]))
    c = sys_.generate(GenerationRequest(prompt=hist[0], max_tokens=3))
    assert c.trace["routed_to"] == e["routed_to"]


def test_every_shipped_candidate_is_a_valid_router() -> None:
    from routers import auto

    names = [n for n, _, _ in auto.CANDIDATES]
    assert len(set(names)) == len(names) and names[-1] == "best-single"
    from routers.learned import parse_member

    for _, key, opts in auto.CANDIDATES:
        make_router(key, **opts)  # an unknown option or kind fails here, not after minutes of fitting
        for member in opts.get("members", ()):
            member_key, member_opts = parse_member(member)
            make_router(member_key, **member_opts)


def test_bench_cramer_rao_floor_of_the_rate_estimate() -> None:
    """bench/routers.py's floor: when the predictions are the correctness itself, the prompts
    carry all the information there is, and each rate's bound is its binomial standard error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_routers", Path(__file__).resolve().parents[2] / "bench" / "routers.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    y = (rng.random((4000, 5)) < np.array([0.2, 0.4, 0.5, 0.6, 0.7])).astype(float)
    info = bench._tilt_information(y, y, n=800)
    sd = y.std(axis=0, ddof=1)
    assert info["rate_se_max"] == pytest.approx(sd.max() / np.sqrt(800))
    assert info["one_expert_se"] == pytest.approx([sd.min() / np.sqrt(800), sd.max() / np.sqrt(800)])
    assert info["mean_rate_se"] == pytest.approx(np.sqrt(np.cov(y.T).sum() / 25 / 800))
    assert info["r2"] == pytest.approx([1.0, 1.0])
    assert info["min_eigenvalue_cross_fitted"] > 0.1
    # weaker evidence (y with 30% of its entries flipped): the bound is wider
    noisy = np.where(rng.random(y.shape) < 0.3, 1 - y, y)
    weak = bench._tilt_information(noisy, y, n=800)
    assert weak["rate_se_max"] > 1.5 * info["rate_se_max"] and weak["r2"][1] < 0.5
