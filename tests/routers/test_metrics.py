from __future__ import annotations

import numpy as np

from collab.stats import bootstrap_ci
from routers.metrics import apgr, cpt, evaluate, pgr_curve, plot_curve
from routers.table import RoutingTable


def _two_expert_table(n: int = 400, seed: int = 0) -> RoutingTable:
    rng = np.random.default_rng(seed)
    strong = (rng.random(n) < 0.8).astype(float)
    weak = np.where(strong == 1, rng.random(n) < 0.7, rng.random(n) < 0.2).astype(float)
    return RoutingTable(["weak", "strong"], [str(i) for i in range(n)], ["t"] * n, [f"p{i}" for i in range(n)], np.stack([weak, strong], 1), np.tile([1.0, 10.0], (n, 1)))


def test_bootstrap_ci_covers_mean() -> None:
    v = np.r_[np.ones(70), np.zeros(30)]
    m, lo, hi = bootstrap_ci(v, 2000)
    assert m == 0.7 and 0.6 < lo < 0.7 < hi < 0.8


def test_apgr_random_half_oracle_high() -> None:
    t = _two_expert_table()
    rng_pref = np.random.default_rng(1).random(len(t))
    s, p = pgr_curve(t, rng_pref, strong=1, weak=0)
    assert abs(apgr(s, p) - 0.5) < 0.08
    oracle_pref = t.scores[:, 1] - t.scores[:, 0]
    s, p = pgr_curve(t, oracle_pref, 1, 0)
    assert apgr(s, p) > 0.85
    assert p[0] == 0 and abs(p[-1] - 1) < 1e-9
    # The oracle reaches full PGR by sending only queries where strong beats weak.
    assert cpt(s, p, 1.0) <= np.mean(oracle_pref > 0) + 0.01


def test_evaluate_reference_points_and_gap() -> None:
    t = _two_expert_table()
    oracle_pred = t.scores.copy()
    ev = evaluate(t, oracle_pred, n_boot=200).data
    assert ev["accuracy"] == ev["oracle"] and abs(ev["gap_closed"] - 1.0) < 1e-9
    assert ev["best_single_expert"] == "strong"
    best = np.tile([0.0, 1.0], (len(t), 1))
    ev2 = evaluate(t, best, n_boot=200).data
    assert ev2["gap_closed"] == 0.0 and ev2["cost"] == 10.0 and ev2["accuracy"] == ev2["best_single"]
    for k in ("accuracy", "best_single", "oracle", "gap_closed", "cost", "apgr", "cpt50", "cpt80", "auc", "random_equal_cost"):
        assert k in ev
    assert ev["auc"] > ev2["auc"] or ev["auc"] >= ev["best_single"]


def test_plot_writes_png(tmp_path) -> None:
    t = _two_expert_table(50)
    ev = evaluate(t, t.scores, n_boot=50)
    out = tmp_path / "c.png"
    plot_curve(str(out), {"oracle": ev.curve}, {"weak": (1.0, 0.5)})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
