"""Routers that hold up when traffic shifts: the best-expert classifier and ``--router auto``.

Random 80/20 splits of a routing table reward whatever memorises its neighbourhoods
(near-duplicate prompts land on both sides; the test split has the training split's task
mix). Real traffic drifts: another mix of tasks, new kinds of prompts. ``select_router``
(behind ``collab route train --router auto``, the default) therefore chooses among a small
fixed set of router kinds and options by a validation protocol that simulates shift on the
user's own training table, never on anything held out for evaluation:

- ``grouped``: k-fold cross-validation whose folds keep every group of near-duplicate
  prompts (cosine >= ``dup_threshold`` of MiniLM embeddings, joined transitively) on one
  side, dealt task by task so each fold keeps the table's task mix;
- ``reweighted``: the same out-of-fold predictions, reweighted to other task mixes (for each
  task, a mix giving it half the weight and the rest in the table's proportions), the best
  single expert re-chosen under each mix; the mean over these mixes (and the worst) is kept;
- ``loto``: leave-one-task-out, each task in turn predicted by a router trained on the
  others, compared with the expert that was best on those others (pooled over tasks).

Each figure is the share of the best-single-to-oracle gap closed. The candidate with the
best mean over the three is chosen and refitted on the whole table. Leave-one-task-out is
also recorded task by task (routed minus fixed expert, paired, 95% z-interval), and a
significant loss of the chosen candidate is named in its reason. (Setting such candidates
aside was tried: on LLMRouter's 80% parts it chose best-single or the classifier on all
six, 0.5% of the gap on random splits, so the mean decides); the protocol, every
candidate's figures and the reason are written into ``config.json`` under ``meta.auto``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Sequence

import numpy as np

from routers.base import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    Router,
    RouterConfig,
    RouterError,
    make_router,
    register_router,
)
from routers.table import RoutingTable


# ------------------------------------------------------------ classifier
def best_expert_labels(scores: np.ndarray, ties: str = "best-mean") -> np.ndarray:
    """(n,) index of each query's best expert. Ties (common: several experts score 1.0)
    go to the expert with the best mean over the table (``ties='best-mean'``) or to the
    first listed (``'first'``, as LLMRouter labels them; measured to route far worse under shift)."""
    if ties == "first":
        return scores.argmax(axis=1)
    if ties != "best-mean":
        raise RouterError(f"classifier: ties: expected 'best-mean' or 'first', found {ties!r}")
    order = np.argsort(-scores.mean(axis=0), kind="stable")  # experts by mean, best first
    at_max = scores[:, order] >= scores.max(axis=1, keepdims=True) - 1e-12  # (n, E) in that order
    return order[at_max.argmax(axis=1)]


@dataclasses.dataclass
class ClassifierRouterConfig(RouterConfig):
    """A classifier of each query's best expert (an MLP on the encoder's features)."""

    bounds: ClassVar[dict[str, Bound]] = {"hidden": AT_LEAST_1, "alpha": NON_NEGATIVE, "max_iter": AT_LEAST_1, "lr": POSITIVE}
    encoder: str = "minilm"
    hidden: tuple[int, ...] = (128, 64)
    """Hidden layer sizes (ReLU)."""
    alpha: float = 1e-4
    """L2 penalty (sklearn's MLPClassifier ``alpha``)."""
    max_iter: int = 200
    lr: float = 1e-3
    ties: str = "best-mean"
    """Which expert a query is labelled with when several share its best score: 'best-mean'
    (the one best on average over the table) or 'first' (the first listed)."""
    early_stopping: bool = False
    """Stop when the score on 10% of the training rows stops improving (tables of 1,000 rows or
    more). Off by default: with most queries labelled with one expert it stops at the majority class."""


@register_router("classifier")
class ClassifierRouter(Router):
    """Predicts P(expert is the query's best | prompt) with a multi-class MLP (sklearn's
    MLPClassifier, stored as its weight arrays and run in NumPy). The per-query best
    expert is the label; ties go to the expert best on average. Its outputs are
    probabilities of being best, not expected scores: ``policy: best`` picks the most
    probable; a cost policy weighs those probabilities."""

    config_cls = ClassifierRouterConfig
    reference_url = "https://github.com/ulab-uiuc/LLMRouter"

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        assert x is not None
        c = self.config
        y = best_expert_labels(table.scores, c.ties)
        self.meta["label_priors"] = [float(v) for v in np.bincount(y, minlength=len(self.experts)) / len(y)]
        classes = np.unique(y)
        self.classes = classes.astype(np.int64)
        if len(classes) == 1:
            self.weights, self.biases = [], []
            return
        early = bool(c.early_stopping and len(x) >= 1000)  # 10% of a small table is too few to stop on
        clf = MLPClassifier(hidden_layer_sizes=tuple(int(h) for h in c.hidden), alpha=c.alpha, max_iter=c.max_iter, learning_rate_init=c.lr, early_stopping=early, random_state=c.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x.astype(np.float32), y)
        self.weights = [w.astype(np.float32) for w in clf.coefs_]
        self.biases = [b.astype(np.float32) for b in clf.intercepts_]

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        out = np.zeros((len(x), len(self.experts)))
        if not self.weights:
            out[:, self.classes[0]] = 1.0
            return out
        h = x.astype(np.float32)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = np.maximum(h @ w + b, 0.0)  # (n, hidden)
        z = h @ self.weights[-1] + self.biases[-1]  # (n, classes), or (n, 1) for two classes
        if z.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-np.clip(z[:, 0], -40, 40)))
            probs = np.stack([1.0 - p1, p1], axis=1)
        else:
            z = np.exp(z - z.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
        out[:, self.classes] = probs
        return out

    def hyperparameters(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self.config)
        hp["hidden"] = [int(h) for h in hp["hidden"]]
        return hp

    def _state(self) -> dict[str, np.ndarray]:
        out = {"classes": self.classes}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"w{i}"], out[f"b{i}"] = w, b
        return out

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.classes = t["classes"].astype(np.int64)
        n = sum(1 for k in t if k.startswith("w"))
        self.weights = [t[f"w{i}"] for i in range(n)]
        self.biases = [t[f"b{i}"] for i in range(n)]
        self.config.hidden = tuple(int(h) for h in self.config.hidden)


# ------------------------------------------------------------ the protocol
#: The candidates ``--router auto`` chooses among: (name, router key, options). Fixed in
#: advance, few, and cheap enough to fit about a dozen times each.
CANDIDATES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("classifier", "classifier", {}),
    ("partition", "partition", {"select": False}),
    ("knn", "knn", {"encoder": "minilm+tfidf"}),
    ("knn-pls", "knn", {"encoder": "minilm+tfidf", "project": 16, "reduce": 128}),
    ("mlp", "mlp", {"encoder": "minilm"}),
    ("partition+knn-pls", "ensemble", {"members": ("partition:select=false", "knn:encoder=minilm+tfidf:project=16:reduce=128")}),
    ("best-single", "best-single", {}),
)


@dataclasses.dataclass
class ShiftProtocol:
    """How ``select_router`` simulates shift on the training table."""

    folds: int = 4
    """Grouped cross-validation folds."""
    dup_threshold: float = 0.9
    """Prompts at least this cosine-similar (MiniLM) are near-duplicates and stay on one side."""
    loto: bool = True
    """Also hold out each task in turn (needs at least two tasks)."""
    min_task: int = 10
    """Tasks with fewer queries are not held out on their own (they stay in training)."""
    dup_encoder: str = "minilm"
    """Encoder whose cosine similarities find the near-duplicates."""
    z: float = 1.96
    """Width of the per-task test of leave-one-task-out losses (1.96: 95% two-sided)."""

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "grouped": f"{self.folds}-fold cross-validation; near-duplicate prompts ({self.dup_encoder} cosine >= {self.dup_threshold}, joined transitively) kept on one side; groups dealt task by task",
            "reweighted": "the grouped out-of-fold predictions reweighted to other task mixes (each task in turn given half the weight, the rest in the table's proportions); best single re-chosen per mix; mean (and worst) over mixes",
            "loto": "each task held out in turn, routed by a router trained on the others, against the expert best on the others; pooled over tasks",
            "criterion": "mean of the grouped, reweighted and leave-one-task-out shares of the best-single-to-oracle gap closed; each held-out task's own routed - fixed difference and its 95% z-interval are recorded (loto_per_task) and a significant loss is named in the reason",
        }


def near_duplicate_groups(x: np.ndarray, threshold: float = 0.9, block: int = 1024) -> np.ndarray:
    """(n,) group id per row: rows whose unit vectors have cosine >= ``threshold`` share a
    group, transitively (union-find over the similarity graph, computed in blocks)."""
    x = np.asarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    parent = np.arange(len(x))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(0, len(x), block):
        sims = x[a : a + block] @ x.T  # (b, n)
        rows, cols = np.nonzero(sims >= threshold)
        for i, j in zip(rows + a, cols):
            if j > i:
                ri, rj = find(int(i)), find(int(j))
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(len(x))])
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def grouped_folds(tasks: Sequence[str], groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_index, val_index) folds that never split a group; groups are dealt round-robin
    task by task (a group's task is its first row's) after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    t = np.asarray(tasks)
    first = {}
    for i, g in enumerate(groups):
        first.setdefault(int(g), i)
    fold_of_group: dict[int, int] = {}
    offset = 0
    for name in sorted(set(tasks)):
        gs = np.array([g for g, i in first.items() if t[i] == name])
        rng.shuffle(gs)
        for j, g in enumerate(gs):
            fold_of_group[int(g)] = (offset + j) % k
        offset += len(gs)
    fold = np.array([fold_of_group[int(g)] for g in groups])
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k) if (fold == f).any() and (fold != f).any()]


def gap_closed(routed: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, reference: np.ndarray | None = None) -> float:
    """Share of the gap from the reference (default: the best single expert on these rows,
    under ``weights``) to the per-query oracle that the routed scores close."""
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    ref = scores[:, int((w @ scores).argmax())] if reference is None else reference
    o = scores.max(axis=1)
    gap = float(w @ o - w @ ref)
    return float((w @ routed - w @ ref) / gap) if gap > 1e-12 else 0.0


def tilted_mixes(tasks: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """For each task, row weights that give it half the total weight and the other tasks the
    rest in their own proportions: (task, (n,) weights)."""
    t = np.asarray(tasks)
    names = sorted(set(tasks))
    if len(names) < 2:
        return []
    share = {n: float((t == n).mean()) for n in names}
    out = []
    for n in names:
        target = {m: 0.5 if m == n else 0.5 * share[m] / (1.0 - share[n]) for m in names}
        out.append((n, np.array([target[x] / share[x] for x in t])))
    return out


def shift_figures(preds_oof: np.ndarray, table: RoutingTable, loto: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """The protocol's figures for one candidate: grouped (out-of-fold predictions ``preds_oof``
    over ``table``), reweighted over the tilted task mixes, and leave-one-task-out from
    ``loto`` = (routed scores, fixed-expert scores, oracle scores) pooled over held-out tasks."""
    routed = table.scores[np.arange(len(table)), preds_oof.argmax(axis=1)]
    out: dict[str, Any] = {"grouped": gap_closed(routed, table.scores)}
    mixes = tilted_mixes(table.tasks)
    if mixes:
        per = {task: gap_closed(routed, table.scores, w) for task, w in mixes}
        out["reweighted"] = float(np.mean(list(per.values())))
        out["reweighted_worst"] = float(min(per.values()))
        out["reweighted_per_task"] = per
    if loto is not None:
        r, f, o = loto
        out["loto"] = float((r.sum() - f.sum()) / (o.sum() - f.sum())) if o.sum() - f.sum() > 1e-12 else 0.0
    keys = [k for k in ("grouped", "reweighted", "loto") if k in out]
    out["score"] = float(np.mean([out[k] for k in keys]))
    return out


def task_delta(routed: np.ndarray, fixed: np.ndarray, z: float = 1.96) -> dict[str, float]:
    """Mean per-query difference routed - fixed on one held-out task, with the upper end of
    its z-interval (paired: both scored on the same queries)."""
    d = np.asarray(routed, dtype=np.float64) - np.asarray(fixed, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"delta": float(d.mean()), "upper": float(d.mean() + z * se), "n": len(d)}


def evaluate_candidates(
    table: RoutingTable,
    candidates: Sequence[tuple[str, str, dict[str, Any]]] = CANDIDATES,
    protocol: ShiftProtocol | None = None,
    seed: int = 0,
    log: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run the shift-simulating protocol on ``table`` for each candidate: name -> figures
    (``grouped``, ``reweighted``, ``reweighted_worst``, ``loto``, ``score``, ``fit_s``)."""
    from routers.encoders import make_encoder

    p = protocol or ShiftProtocol()
    if len(table) < 2 * p.folds:
        raise RouterError(f"{table.source}: --router auto needs at least {2 * p.folds} queries for its {p.folds} validation folds, found {len(table)}")
    enc = make_encoder(p.dup_encoder)
    if hasattr(enc, "fit"):
        enc.fit(table.prompts)
    groups = near_duplicate_groups(enc.encode(table.prompts), p.dup_threshold)
    folds = grouped_folds(table.tasks, groups, p.folds, seed)
    t = np.asarray(table.tasks)
    held_tasks = [n for n in table.task_names if (t == n).sum() >= p.min_task] if p.loto and len(table.task_names) >= 2 else []
    out: dict[str, dict[str, Any]] = {}
    for name, key, opts in candidates:
        t0 = time.perf_counter()
        oof = np.zeros(table.scores.shape)
        for tr, va in folds:
            r = make_router(key, **{**opts, "seed": seed}).fit(table.subset(tr))
            oof[va] = r.predict(table.subset(va).prompts)
        loto = None
        per_task: dict[str, dict[str, float]] = {}
        if held_tasks:
            rs, fs, os_ = [], [], []
            for task in held_tasks:
                tr_t, te_t = table.subset(np.flatnonzero(t != task)), table.subset(np.flatnonzero(t == task))
                r = make_router(key, **{**opts, "seed": seed}).fit(tr_t)
                choice = r.predict(te_t.prompts).argmax(axis=1)
                rs.append(te_t.scores[np.arange(len(te_t)), choice])
                fs.append(te_t.scores[:, int(tr_t.scores.mean(axis=0).argmax())])
                os_.append(te_t.scores.max(axis=1))
                per_task[task] = task_delta(rs[-1], fs[-1], p.z)
            loto = (np.concatenate(rs), np.concatenate(fs), np.concatenate(os_))
        figs = shift_figures(oof, table, loto) | {"fit_s": time.perf_counter() - t0}
        if per_task:
            figs["loto_per_task"] = per_task
            figs["loto_worst_upper"] = min(v["upper"] for v in per_task.values())
        out[name] = figs
        if log is not None:
            log(f"auto: {name}: " + ", ".join(f"{k} {figs[k]:.1%}" for k in ("grouped", "reweighted", "loto", "score") if k in figs))
    return out


def select_router(
    table: RoutingTable,
    seed: int = 0,
    candidates: Sequence[tuple[str, str, dict[str, Any]]] = CANDIDATES,
    protocol: ShiftProtocol | None = None,
    log: Any = None,
) -> Router:
    """``--router auto``: evaluate ``candidates`` by the shift-simulating protocol on
    ``table``, refit the best on the whole table and record the choice in ``meta.auto``."""
    p = protocol or ShiftProtocol()
    figs = evaluate_candidates(table, candidates, p, seed, log)
    ranked = sorted((c[0] for c in candidates), key=lambda n: -figs[n]["score"])
    name, key, opts = next(c for c in candidates if c[0] == ranked[0])
    best = figs[name]
    reason = f"{name} closed the most of the best-single-to-oracle gap under simulated shift (mean {best['score']:.1%} over grouped, reweighted and leave-one-task-out validation)"
    if len(ranked) > 1:
        reason += f"; next {ranked[1]} {figs[ranked[1]]['score']:.1%}"
    if best.get("loto_worst_upper", 0.0) < 0.0:
        worst = _worst_task(best)
        reason += f"; caution: with '{worst}' held out it lost significantly to the expert best on the other tasks ({best['loto_per_task'][worst]['delta']:+.3f} per query), so an unseen task unlike the table's may lose too"
    r = make_router(key, **{**opts, "seed": seed}).fit(table)
    r.meta["auto"] = {
        "chosen": name,
        "key": key,
        "options": _jsonable(opts),
        "reason": reason,
        "protocol": p.describe() | {"seed": seed, "queries": len(table)},
        "candidates": [{"name": n, "key": k, "options": _jsonable(o)} | figs[n] for n, k, o in candidates],
    }
    return r


def _worst_task(figs: dict[str, Any]) -> str:
    per = figs.get("loto_per_task") or {}
    return min(per, key=lambda t: per[t]["upper"]) if per else ""


def _jsonable(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
