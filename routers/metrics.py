"""Routing metrics: accuracy with bootstrap intervals, the reference points (best
single expert, random at equal cost, per-task and per-query oracles), the share
of the best-single-to-oracle gap closed, RouteLLM's APGR and CPT for two experts,
and the cost-quality curve with its AUC (and a PNG of it).

RouteLLM (Ong et al. 2024, https://arxiv.org/abs/2406.18665, section 5.1):
PGR = (r - weak) / (strong - weak); APGR is PGR averaged over the share of calls
routed to the strong model from 0 to 100%; CPT(x%) is the smallest share of
strong-model calls at which PGR reaches x%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from collab.stats import bootstrap_ci
from routers.table import RoutingTable


def routed_scores(table: RoutingTable, choice: np.ndarray) -> np.ndarray:
    """Per-query score of the chosen expert: (n,)."""
    return table.scores[np.arange(len(table)), np.asarray(choice, dtype=np.int64)]


def routed_costs(table: RoutingTable, choice: np.ndarray) -> np.ndarray:
    return table.costs[np.arange(len(table)), np.asarray(choice, dtype=np.int64)]


def per_task_oracle(table: RoutingTable) -> np.ndarray:
    """(n,) scores when each task goes to its best expert (chosen on this table)."""
    tasks = np.asarray(table.tasks)
    out = np.zeros(len(table))
    for t in table.task_names:
        m = tasks == t
        out[m] = table.scores[m][:, int(table.scores[m].mean(axis=0).argmax())]
    return out


def gap_closed(router: np.ndarray, best: np.ndarray, oracle: np.ndarray) -> float:
    gap = oracle.mean() - best.mean()
    return float((router.mean() - best.mean()) / gap) if gap > 1e-12 else 0.0


def paired_bootstrap(router: np.ndarray, best: np.ndarray, oracle: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Intervals for router - best and for the gap closed, resampling queries jointly."""
    rng = np.random.default_rng(seed)
    n = len(router)
    idx = rng.integers(0, n, size=(n_boot, n))
    r, b, o = router[idx].mean(1), best[idx].mean(1), oracle[idx].mean(1)
    diff = r - b
    gap = np.where(o - b > 1e-12, (r - b) / np.maximum(o - b, 1e-12), 0.0)
    return {
        "delta": float(router.mean() - best.mean()),
        "delta_low": float(np.quantile(diff, 0.025)),
        "delta_high": float(np.quantile(diff, 0.975)),
        "gap_closed": gap_closed(router, best, oracle),
        "gap_closed_low": float(np.quantile(gap, 0.025)),
        "gap_closed_high": float(np.quantile(gap, 0.975)),
    }


# ------------------------------------------------------------ two experts
def pgr_curve(table: RoutingTable, strong_pref: np.ndarray, strong: int, weak: int, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(share of calls to strong in [0, 1], PGR) when the queries with the highest
    ``strong_pref`` go to the strong model."""
    s, w = table.scores[:, strong], table.scores[:, weak]
    order = np.argsort(-np.asarray(strong_pref), kind="stable")
    n = len(table)
    # Cumulative gain of sending the top-k queries to strong instead of weak.
    gain = np.concatenate([[0.0], np.cumsum((s - w)[order])])
    shares = np.linspace(0, 1, points)
    ks = np.rint(shares * n).astype(int)
    perf = (w.sum() + gain[ks]) / n
    denom = s.mean() - w.mean()
    pgr = (perf - w.mean()) / denom if abs(denom) > 1e-12 else np.zeros_like(perf)
    return shares, pgr


def apgr(shares: np.ndarray, pgr: np.ndarray) -> float:
    """Average PGR over the share of strong calls (trapezoid rule on [0, 1])."""
    return float(np.trapezoid(pgr, shares) / (shares[-1] - shares[0]))


def cpt(shares: np.ndarray, pgr: np.ndarray, target: float) -> float:
    """Smallest share of strong calls with PGR >= target (1.0 if never reached)."""
    hit = np.flatnonzero(pgr >= target - 1e-12)
    return float(shares[hit[0]]) if len(hit) else 1.0


def two_expert_metrics(table: RoutingTable, pred: np.ndarray) -> dict[str, Any]:
    """APGR and CPT(50%)/CPT(80%); strong = the expert with the higher mean score."""
    means = table.scores.mean(axis=0)
    strong, weak = int(means.argmax()), int(means.argmin())
    pref = pred[:, strong] - pred[:, weak]
    shares, pgr = pgr_curve(table, pref, strong, weak)
    rs, rp = pgr_curve(table, np.random.default_rng(0).random(len(table)), strong, weak)
    return {
        "strong": table.experts[strong],
        "weak": table.experts[weak],
        "apgr": apgr(shares, pgr),
        "cpt50": cpt(shares, pgr, 0.5),
        "cpt80": cpt(shares, pgr, 0.8),
        "random_apgr": apgr(rs, rp),
    }


# ----------------------------------------------------- cost-quality curve
def cost_quality_curve(table: RoutingTable, pred: np.ndarray, lambdas: int = 41) -> tuple[np.ndarray, np.ndarray]:
    """(mean cost, mean quality) of the quality - lambda * cost policy over a lambda sweep,
    cost scaled by the most expensive expert's mean cost."""
    from routers.policies import quality_minus_cost

    scale = max(float(table.costs.mean(axis=0).max()), 1e-12)
    pts = []
    for lam in np.concatenate([[0.0], np.geomspace(1e-3, 1e2, lambdas - 1)]):
        ch = quality_minus_cost(pred, table.costs / scale, float(lam))
        pts.append((routed_costs(table, ch).mean(), routed_scores(table, ch).mean()))
    pts.sort()
    c, q = np.array(pts).T
    return c, q


def curve_auc(table: RoutingTable, costs: np.ndarray, quality: np.ndarray) -> float:
    """Area under the best-quality-at-or-below-cost envelope, cost normalised to
    [0, 1] between always-cheapest and always-most-expensive expert."""
    mc = table.costs.mean(axis=0)
    lo, hi = float(mc.min()), float(mc.max())
    if hi - lo < 1e-12:
        return float(np.max(quality))
    x = np.clip((np.asarray(costs) - lo) / (hi - lo), 0, 1)
    grid = np.linspace(0, 1, 201)
    env = np.full_like(grid, np.nan)
    for i, g in enumerate(grid):
        ok = x <= g + 1e-9
        if ok.any():
            env[i] = quality[ok].max()
    first = np.flatnonzero(~np.isnan(env))
    if len(first) == 0:
        return 0.0
    env[: first[0]] = env[first[0]]  # below the router's cheapest point: its cheapest quality
    return float(np.trapezoid(env, grid))


@dataclass
class Evaluation:
    """Everything ``collab route eval`` reports; ``to_json`` is the ``--json`` object."""

    data: dict[str, Any]
    curve: tuple[np.ndarray, np.ndarray]

    def to_json(self) -> dict[str, Any]:
        return self.data


def evaluate(table: RoutingTable, pred: np.ndarray, choice: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> Evaluation:
    """Score a router's predictions (and the policy's choices, default best predicted) on ``table``."""
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != table.scores.shape:
        raise ValueError(f"predictions have shape {pred.shape}, the table {table.scores.shape}")
    if choice is None:
        choice = pred.argmax(axis=1)
    r = routed_scores(table, choice)
    means = table.scores.mean(axis=0)
    b_idx = int(means.argmax())
    best = table.scores[:, b_idx]
    oracle = table.scores.max(axis=1)
    task_oracle = per_task_oracle(table)
    share = np.bincount(choice, minlength=len(table.experts)) / len(table)
    random_equal = float(share @ means)
    acc, lo, hi = bootstrap_ci(r, n_boot, seed)
    experts = {}
    for j, e in enumerate(table.experts):
        m, l, h = bootstrap_ci(table.scores[:, j], n_boot, seed)
        experts[e] = {"accuracy": m, "low": l, "high": h, "cost": float(table.costs[:, j].mean()), "share": float(share[j])}
    c, q = cost_quality_curve(table, pred)
    data: dict[str, Any] = {
        "queries": len(table),
        "experts": experts,
        "accuracy": acc,
        "accuracy_low": lo,
        "accuracy_high": hi,
        "cost": float(routed_costs(table, choice).mean()),
        "best_single": float(best.mean()),
        "best_single_expert": table.experts[b_idx],
        "best_single_cost": float(table.costs[:, b_idx].mean()),
        "random_equal_cost": random_equal,
        "task_oracle": float(task_oracle.mean()),
        "oracle": float(oracle.mean()),
        "auc": curve_auc(table, c, q),
        "share": {e: float(share[j]) for j, e in enumerate(table.experts)},
    }
    data.update(paired_bootstrap(r, best, oracle, n_boot, seed))
    if len(table.experts) == 2:
        data.update(two_expert_metrics(table, pred))
    return Evaluation(data, (c, q))


def plot_curve(path: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]], points: dict[str, tuple[float, float]], title: str = "cost-quality") -> None:
    """Write a PNG: one line per router curve, one marker per single expert / reference point."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, (c, q) in curves.items():
        ax.plot(c, q, marker=".", label=name)
    for name, (c, q) in points.items():
        ax.scatter([c], [q], marker="x")
        ax.annotate(name, (c, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean cost per query")
    ax.set_ylabel("mean quality")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())


def _atomic_write_bytes(path: str, data: bytes) -> None:
    import os
    import tempfile
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, p)
