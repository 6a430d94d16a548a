"""An out-of-distribution guard around any router: ``guarded``.

A learned router extrapolates badly on prompts unlike its training data (on
LLMRouter, a held-out task of long reading passages went to the wrong experts and
lost 5.6 points against the expert that is best overall). The guard measures how
far each prompt is from the training prompts and, where it is far, shrinks the
base router's predictions toward the per-expert training means, i.e. toward the
best single expert.

Statistic (in the guard's own embedding space, MiniLM by default, rows L2-normalised):

- ``similarity``: mean cosine similarity of the prompt to its k nearest training prompts;
- ``relative``: that similarity divided by the mean of the same statistic of those k
  neighbours (each computed leaving itself out), like a local outlier factor: a prompt
  in a sparse but well-covered region scores about 1, a prompt whose nearest training
  prompts sit in a dense region of *other* material scores well below 1.

Weight: with thresholds ``lo <= hi`` (absolute values of the statistic),
``w = clip((s - lo) / (hi - lo), 0, 1)``, or the step ``w = [s >= lo]`` when ``lo == hi``
(hard fallback); the prediction is ``w * base + (1 - w) * training means``.

Calibration, on the training table only: the thresholds are quantiles of the
training prompts' own (leave-self-out) statistic. With ``select`` the statistic and
the quantiles are chosen from a grid (including no guard at all) by the routed score on
out-of-fold predictions of the base router: leave-one-*training*-task-out (each
training task held out in turn, the base router refitted on the others: the situation
of an unseen task) pooled with stratified k-fold predictions (in-distribution
prompts, so the guard does not throw away gains where the router is on home ground).
Inside every fold the quantiles are taken of that fold's own training part, so a
quantile means the same thing in calibration and at test time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import numpy as np

from routers.base import AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT, Bound, Router, RouterConfig, RouterError, WrapperRouter, register_router
from routers.encoders import normalise_rows
from routers.table import RoutingTable, kfold_indices

STATISTICS = ("similarity", "relative")


def knn_similarity(q: np.ndarray, ref: np.ndarray, k: int, exclude_self: bool = False, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(mean cosine similarity of each row of ``q`` to its k nearest rows of ``ref``, (n, k) their indices).
    Both inputs L2-normalised. ``exclude_self``: ``q`` is ``ref`` and row i skips itself."""
    from routers.learned import _similarities

    k = max(1, min(int(k), len(ref) - (1 if exclude_self else 0)))
    means = np.empty(len(q), dtype=np.float64)
    idx = np.empty((len(q), k), dtype=np.int64)
    for a in range(0, len(q), chunk):
        s = _similarities(q[a : a + chunk], ref).astype(np.float32, copy=False)
        if exclude_self:
            s = s.copy()
            s[np.arange(len(s)), np.arange(a, a + len(s))] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        means[a : a + len(s)] = np.take_along_axis(s, top, axis=1).mean(axis=1)
        idx[a : a + len(s)] = top
    return means, idx


@dataclasses.dataclass
class _Space:
    """The training prompts of one (fold's) guard: normalised vectors and their leave-self-out statistic."""

    x: np.ndarray
    self_sim: np.ndarray
    k: int
    self_idx: np.ndarray | None = None

    @classmethod
    def build(cls, x: np.ndarray, k: int) -> "_Space":
        x = normalise_rows(x)
        if len(x) < 2:
            return cls(x, np.ones(len(x)), k)
        s, idx = knn_similarity(x, x, k, exclude_self=True)
        return cls(x, s, k, idx)

    def statistic(self, q: np.ndarray, kind: str) -> np.ndarray:
        s, idx = knn_similarity(normalise_rows(q), self.x, self.k)
        if kind == "similarity":
            return s
        if kind == "relative":
            return s / np.maximum(self.self_sim[idx].mean(axis=1), 1e-6)
        raise RouterError(f"guarded: statistic: expected one of {', '.join(STATISTICS)}, found {kind!r}")

    def reference(self, kind: str) -> np.ndarray:
        """The statistic of each training prompt, leaving itself out (the calibration distribution)."""
        if kind == "similarity":
            return self.self_sim
        if len(self.x) < 2:
            return np.ones(len(self.x))
        idx = self.self_idx
        if idx is None:
            _, idx = knn_similarity(self.x, self.x, self.k, exclude_self=True)
        return self.self_sim / np.maximum(self.self_sim[idx].mean(axis=1), 1e-6)


def guard_weight(stat: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Trust in the base router, in [0, 1]: a step at ``lo`` when ``hi <= lo``, else a linear ramp."""
    stat = np.asarray(stat, dtype=np.float64)
    if hi <= lo:
        return (stat >= lo).astype(np.float64)
    return np.clip((stat - lo) / (hi - lo), 0.0, 1.0)


def candidates(grid: Sequence[float], mode: str) -> list[tuple[float, float]]:
    """(low, high) quantile pairs: hard steps (low == high) and/or ramps (low < high; low 0 = the minimum)."""
    qs = sorted({float(q) for q in grid})
    out: list[tuple[float, float]] = []
    if mode in ("auto", "hard"):
        out += [(q, q) for q in qs]
    if mode in ("auto", "shrink"):
        lows = [0.0] + qs
        out += [(a, b) for a in lows for b in qs if a < b]
    return out


Candidate = tuple[str, float, float]


def evaluate_candidates(records: Sequence[dict[str, Any]], cands: Sequence[tuple[float, float]]) -> dict[Candidate, dict[str, dict[str, float]]]:
    """For each candidate (statistic, low quantile, high quantile), and 'off': per group,
    n, the summed routed score, the summed difference to the fold's fixed expert (best on
    the fold's training part), its summed square and the number of guarded queries."""
    out: dict[Candidate, dict[str, dict[str, float]]] = {}

    def add(key: Candidate, group: str, got: np.ndarray, fixed: np.ndarray, guarded: int) -> None:
        g = out.setdefault(key, {}).setdefault(group, {"n": 0.0, "score": 0.0, "diff": 0.0, "diff2": 0.0, "guarded": 0.0})
        d = got - fixed
        g["n"] += len(got)
        g["score"] += float(got.sum())
        g["diff"] += float(d.sum())
        g["diff2"] += float((d * d).sum())
        g["guarded"] += guarded

    for r in records:
        y, pred, means = r["y"], r["pred"], r["means"]
        rows = np.arange(len(y))
        routed = y[rows, pred.argmax(axis=1)]
        fixed = y[:, int(means.argmax())]
        add(("off", 0.0, 0.0), r["group"], routed, fixed, 0)
        for s, (stat, ref) in r["stats"].items():
            for a, b in cands:
                lo = float(np.quantile(ref, a)) if a > 0 else float(ref.min())
                hi = float(np.quantile(ref, b)) if b > a else lo
                w = guard_weight(stat, lo, hi)
                if b > a:
                    got = y[rows, (w[:, None] * pred + (1 - w[:, None]) * means[None]).argmax(axis=1)]
                else:
                    got = np.where(w > 0, routed, fixed)
                add((s, a, b), r["group"], got, fixed, int((w < 1).sum()))
    return out


def _summary(groups: dict[str, dict[str, float]], z: float) -> dict[str, Any]:
    """Objective ingredients of one candidate: the mean score of the task-out and in-distribution
    parts, and per group the mean difference to the fixed expert with its upper bound."""
    parts: dict[str, list[float]] = {}
    for g, v in groups.items():
        parts.setdefault(g.split(":")[0], [0.0, 0.0])
        parts[g.split(":")[0]][0] += v["score"]
        parts[g.split(":")[0]][1] += v["n"]
    out: dict[str, Any] = {"score": float(np.mean([a / n for a, n in parts.values()]))}
    out.update({f"{p}_score": a / n for p, (a, n) in parts.items()})
    upper = {}
    for g, v in groups.items():
        m = v["diff"] / v["n"]
        var = max(v["diff2"] / v["n"] - m * m, 0.0)
        upper[g] = {"delta": m, "upper": m + z * float(np.sqrt(var / max(v["n"] - 1, 1))), "guarded_share": v["guarded"] / v["n"]}
    out["groups"] = upper
    out["worst_upper"] = min(u["upper"] for u in upper.values())
    task_out = [u["delta"] for g, u in upper.items() if g.startswith("task_out:")] or [u["delta"] for u in upper.values()]
    out["worst_task_delta"] = min(task_out)
    return out


def choose(grid: dict[Candidate, dict[str, dict[str, float]]], objective: str, z: float = 1.96) -> tuple[Candidate, list[Candidate]]:
    """The chosen candidate and all candidates ranked. 'mean': the highest mean score
    (task-out and in-distribution parts weighing the same). 'safe': the same among the
    candidates under which no calibration group (held-out training task, or the
    in-distribution folds) loses significantly against its fixed expert (upper bound of
    the z-interval of the mean difference >= 0); if none qualifies, the one whose worst
    group comes closest. 'minimax': the candidate whose worst held-out training task does
    best against its fixed expert (mean difference, to 4 decimals), then the highest mean:
    robust to the one unseen task that is unlike the rest. Ties go to the least
    intervention ('off', then low quantiles)."""
    if objective not in ("mean", "safe", "minimax"):
        raise RouterError(f"guarded: objective: expected 'mean', 'safe' or 'minimax', found {objective!r}")
    summ = {k: _summary(v, z) for k, v in grid.items()}

    def rank(k: Candidate) -> tuple:
        tie = (k[0] == "off", -k[2], -k[1])
        if objective == "mean":
            return (round(summ[k]["score"], 12), *tie)
        if objective == "minimax":
            return (round(summ[k]["worst_task_delta"], 4), round(summ[k]["score"], 12), *tie)
        ok = summ[k]["worst_upper"] >= 0
        return (ok, round(summ[k]["score"], 12) if ok else round(summ[k]["worst_upper"], 12), *tie)

    ranked = sorted(grid, key=rank, reverse=True)
    return ranked[0], ranked


@dataclasses.dataclass
class GuardedRouterConfig(RouterConfig):
    """Out-of-distribution guard around a base router (see routers/guard.py)."""

    bounds: ClassVar[dict[str, Bound]] = {"k": AT_LEAST_1, "low": UNIT, "high": UNIT, "grid_quantiles": UNIT, "folds": NON_NEGATIVE, "z": POSITIVE}
    encoder: str = "minilm"
    """Embedding space of the guard's statistic (independent of the base router's encoder)."""
    base: str = "ensemble"
    """The guarded router, as 'key' or 'key:option=value:...' (trained with this seed)."""
    k: int = 10
    """Nearest training prompts averaged by the statistic."""
    mode: str = "auto"
    """'auto' (hard steps and ramps), 'hard' (fall back below a threshold), 'shrink' (linear ramp), 'off'."""
    statistic: str = "relative"
    """'similarity' or 'relative' (chosen from grid_statistic when select is on)."""
    low: float = 0.1
    """Quantile of the training statistic below which the router falls back entirely."""
    high: float = 0.1
    """Quantile above which the base router is trusted fully (== low: a hard step)."""
    select: bool = True
    """Choose statistic, low and high (or no guard) by out-of-fold routed score on the training table."""
    grid_quantiles: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    grid_statistic: tuple[str, ...] = STATISTICS
    folds: int = 5
    """In-distribution k-fold part of the calibration (0: leave-one-task-out only)."""
    task_out: bool = True
    """Leave-one-training-task-out part of the calibration (needs at least two tasks)."""
    objective: str = "safe"
    """'safe': the best calibration score among candidates with no significant loss on any
    held-out training task; 'minimax': the best worst held-out training task; 'mean': the
    best calibration score."""
    z: float = 1.96
    """Width of the 'safe' test (1.96: 95% two-sided)."""
    calibrate_with: str = ""
    """Router spec fitted in the calibration folds instead of ``base`` ('' = base itself);
    a cheaper stand-in for routers that take minutes to fit."""


@register_router("guarded")
class GuardedRouter(WrapperRouter):
    """Any router, with predictions shrunk toward the training means (the best single
    expert) for prompts far from the training prompts. The base router is saved in
    ``base/`` beside the guard's config.json."""

    config_cls = GuardedRouterConfig
    wrapper_noun = "guard"

    # ------------------------------------------------------------ training
    def _make(self, spec: str) -> Router:
        from routers.base import make_router
        from routers.learned import parse_member

        key, opts = parse_member(spec)
        if key == "guarded":
            raise RouterError("guarded: base: a guarded router cannot guard another guarded router")
        return make_router(key, **{**opts, "seed": self.config.seed})

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        assert x is not None
        c = self.config
        if c.mode not in ("auto", "hard", "shrink", "off"):
            raise RouterError(f"guarded: mode: expected auto, hard, shrink or off, found {c.mode!r}")
        for s in (c.statistic, *c.grid_statistic):
            if s not in STATISTICS:
                raise RouterError(f"guarded: statistic: expected one of {', '.join(STATISTICS)}, found {s!r}")
        if self.base is None:
            self.base = self._make(c.base)
            self.base.fit(table)
        else:
            c.base = self.base.key
        if self.base.experts != self.experts:
            raise RouterError(f"guarded: the base router's experts {self.base.experts} differ from the table's {self.experts}")
        self.means = table.scores.mean(axis=0).astype(np.float64)
        self.space = _Space.build(x, c.k)
        if c.select and c.mode != "off":
            self._select(x, table)
        self._set_thresholds()

    def _set_thresholds(self) -> None:
        c = self.config
        if c.mode == "off":
            self.thresholds = np.array([-np.inf, -np.inf])
            return
        ref = self.space.reference(c.statistic)
        lo = float(np.quantile(ref, c.low)) if c.low > 0 else float(ref.min())
        hi = float(np.quantile(ref, c.high)) if c.high > 0 else float(ref.min())
        self.thresholds = np.array([lo, max(lo, hi)])

    def _calibration_folds(self, table: RoutingTable) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(group, train index, held-out index): one fold per training task held out
        (group = that task's name) and ``folds`` stratified folds (group 'in_dist')."""
        c = self.config
        out: list[tuple[str, np.ndarray, np.ndarray]] = []
        tasks = np.asarray(table.tasks)
        if c.task_out and len(table.task_names) >= 2:
            for t in table.task_names:
                out.append((f"task_out:{t}", np.flatnonzero(tasks != t), np.flatnonzero(tasks == t)))
        if c.folds >= 2 and len(table) >= 2 * c.folds:
            for tr, va in kfold_indices(table.tasks, c.folds, c.seed + 104729):
                out.append(("in_dist", tr, va))
        return out

    def calibration_records(self, x: np.ndarray, table: RoutingTable) -> list[dict[str, Any]]:
        """Out-of-fold material for the choice: per fold, the held-out rows' true scores, the
        calibration router's predictions, the fold's training means and, per statistic, the
        held-out rows' statistic and the fold's training reference distribution."""
        c = self.config
        spec = c.calibrate_with or c.base
        records = []
        for group, tr_i, va_i in self._calibration_folds(table):
            sub = table.subset(tr_i)
            pred = self._make(spec).fit(sub).predict([table.prompts[i] for i in va_i])
            space = _Space.build(x[tr_i], c.k)
            stats = {s: (space.statistic(x[va_i], s), space.reference(s)) for s in (tuple(c.grid_statistic) or (c.statistic,))}
            records.append({"group": group, "y": table.scores[va_i], "pred": pred, "means": sub.scores.mean(axis=0), "stats": stats})
        return records

    def _select(self, x: np.ndarray, table: RoutingTable) -> None:
        """Grid search on out-of-fold predictions of the training table (never the test set)."""
        c = self.config
        records = self.calibration_records(x, table)
        if not records:
            self.meta["guard"] = {"selected": False, "why": "no calibration folds (one task and too few rows for k-fold)"}
            return
        grid = evaluate_candidates(records, candidates(c.grid_quantiles, c.mode))
        best, ranked = choose(grid, c.objective, c.z)
        if best[0] == "off":
            c.mode = "off"
        else:
            c.statistic, c.low, c.high = best
        self.meta["guard"] = {
            "selected": True,
            "calibrated_with": c.calibrate_with or c.base,
            "objective": c.objective,
            "groups": {g: int(v["n"]) for g, v in grid[("off", 0.0, 0.0)].items()},
            "chosen": {"statistic": best[0], "low": best[1], "high": best[2], **_summary(grid[best], c.z)},
            "off": _summary(grid[("off", 0.0, 0.0)], c.z),
            "grid": [{"statistic": k[0], "low": k[1], "high": k[2], **_summary(grid[k], c.z)} for k in ranked],
        }

    # ------------------------------------------------------------ inference
    def _weights(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        if c.mode == "off":
            return np.full(len(x), np.nan), np.ones(len(x))
        stat = self.space.statistic(x, c.statistic)
        lo, hi = float(self.thresholds[0]), float(self.thresholds[1])
        return stat, guard_weight(stat, lo, hi)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None and self.base is not None
        base = self.base.predict(prompts)
        _, w = self._weights(x)
        return w[:, None] * base + (1 - w[:, None]) * self.means[None]

    def explain(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        """Predictions and, per prompt, the guard's verdict: statistic, thresholds, weight and a reason."""
        prompts = list(prompts)
        x = self.features(prompts)
        assert x is not None
        pred = self.predict_features(x, prompts)
        stat, w = self._weights(x)
        c = self.config
        best = self.experts[int(self.means.argmax())]
        lo, hi = float(self.thresholds[0]), float(self.thresholds[1])
        name = "similarity" if c.statistic == "similarity" else "relative similarity"
        notes: list[dict[str, Any] | None] = []
        for s, wi in zip(stat, w):
            if c.mode == "off":
                notes.append({"guard": "off", "weight": 1.0, "reason": "guard off (calibration found no gain from it)"})
                continue
            note: dict[str, Any] = {"statistic": c.statistic, "value": round(float(s), 4), "low": round(lo, 4), "high": round(hi, 4), "weight": round(float(wi), 4), "best_single": best}
            if wi >= 1.0:
                note["reason"] = f"in distribution: {name} {s:.2f} >= {hi:.2f}"
            elif wi <= 0.0:
                note["reason"] = f"out of distribution: {name} {s:.2f} < {lo:.2f}, fell back to best single ({best})"
            else:
                note["reason"] = f"near the edge of the training data: {name} {s:.2f} between {lo:.2f} and {hi:.2f}, predictions shrunk {1 - wi:.0%} toward the training means (best single {best})"
            notes.append(note)
        return pred, notes

    # ------------------------------------------------------------ artefacts
    def _state(self) -> dict[str, np.ndarray]:
        return {"train_x": self.space.x, "self_sim": np.asarray(self.space.self_sim, dtype=np.float64), "means": self.means, "thresholds": np.asarray(self.thresholds, dtype=np.float64)}

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.space = _Space(t["train_x"], t["self_sim"], int(self.config.k))
        self.means, self.thresholds = t["means"], t["thresholds"]
        c = self.config
        c.grid_quantiles, c.grid_statistic = tuple(c.grid_quantiles), tuple(c.grid_statistic)

    def hyperparameters(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self.config)
        hp["grid_quantiles"], hp["grid_statistic"] = list(hp["grid_quantiles"]), list(hp["grid_statistic"])
        return hp
