"""Routers benchmark: held-out quality on LLMRouter (5 seeds, 80/20), leave-one-task-out,
RouteLLM MMLU/GSM8K APGR and CPT, and decision latency next to the raw encoder.

    .venv/bin/python bench/routers.py [--seeds 5] [--skip-quality] [--skip-routellm] [--skip-latency] [--bert]

Leave-one-task-out with the out-of-distribution guard next to the plain ensemble:

    .venv/bin/python bench/routers.py --skip-quality --skip-routellm --skip-latency \
        --loto-routers ensemble,guarded,guarded:mode=hard:select=false:statistic=similarity:low=0.3:high=0.3

and with the guard calibrated for the worst held-out training task:

    .venv/bin/python bench/routers.py --skip-quality --skip-routellm --skip-latency --loto-routers ensemble,guarded:objective=minimax

Shift-aware figures (random, grouped and reweighted-mix splits; --router auto nested):

    .venv/bin/python bench/routers.py --skip-quality --skip-loto --skip-routellm --skip-latency --shift

and label-free prior adaptation (`route adapt`) on simulated shifts (``--identifiability 1,2`` adds the
Cramer-Rao floor of its rate estimate):

    .venv/bin/python bench/routers.py --skip-quality --skip-loto --skip-routellm --skip-latency --adapt partition:select=false --adapt-seeds 1,2,3

(``--adapt-pool 0.5 --adapt-sampling exact`` draws each sample without replacement, an exact
draw from the shifted population; the default resamples one test part). Decision latency of
some rows only, e.g. what ``--router auto`` chooses:

    .venv/bin/python bench/routers.py --skip-quality --skip-loto --skip-routellm \
        --latency-routers "auto's ensemble (partition select=false + knn minilm+tfidf, pls 16, pca 128)"

Prints Markdown tables (results for docs/benchmarks.md) and writes them to
runs/bench-routers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this file's folder comes first on sys.path and its name shadows the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
warnings.filterwarnings("ignore")

from routers.base import make_router  # noqa: E402
from routers.metrics import evaluate  # noqa: E402
from routers.table import from_llmrouter, from_routellm_gsm8k, from_routellm_mmlu  # noqa: E402

ROUTERS = {
    "best-single": ("best-single", {}),
    "random": ("random", {}),
    "knn (tfidf, k=10)": ("knn", {"encoder": "tfidf", "k": 10, "weighting": "uniform"}),
    "knn (minilm, k=100)": ("knn", {}),
    # MiniLM next to SmolLM2-135M's mean-pooled hidden states at layers 7 and 30 (routers/encoders.py LMEncoder).
    "knn (minilm+lm, k=100)": ("knn", {"encoder": "minilm+lm"}),
    # The same with Gemma-3-270M (18 layers) at the corresponding depths, 4 and 18, alone and beside SmolLM2.
    "knn (minilm+lm gemma, k=100)": ("knn", {"encoder": "minilm+lm=zoo:gemma3-270m@4,18"}),
    "knn (minilm+lm+lm gemma, k=100)": ("knn", {"encoder": "minilm+lm+lm=zoo:gemma3-270m@4,18"}),
    # TF-IDF (LSA) beside them, and 16 supervised PLS directions (per-query-centred scores) added to the kNN metric.
    "knn (minilm+lm+tfidf, k=100)": ("knn", {"encoder": "minilm+lm+tfidf"}),
    "knn (minilm+lm+tfidf, pls 16, k=100)": ("knn", {"encoder": "minilm+lm+tfidf", "project": 16}),
    "knn (minilm+lm, pls 16, k=100)": ("knn", {"encoder": "minilm+lm", "project": 16}),
    # The same similarities in the 128 principal directions of the training vectors (head 7x cheaper here).
    "knn (minilm+lm+tfidf, pls 16, pca 128, k=100)": ("knn", {"encoder": "minilm+lm+tfidf", "project": 16, "reduce": 128}),
    "logreg (minilm)": ("logreg", {"encoder": "minilm"}),
    "mlp (minilm)": ("mlp", {"encoder": "minilm"}),
    "mf (minilm)": ("mf", {}),
    "subject (task)": ("subject", {}),
    "subject (cluster 32)": ("subject", {"mode": "cluster", "clusters": 32}),
    "ensemble": ("ensemble", {}),
    "partition": ("partition", {}),
    # The out-of-distribution guard (routers/guard.py) around the ensemble: calibrated on the
    # training table (inner leave-one-training-task-out + 5-fold), and one fixed setting.
    "guarded ensemble": ("guarded", {}),
    "guarded ensemble (minimax)": ("guarded", {"objective": "minimax"}),
    "guarded knn minilm+lm (minimax)": ("guarded", {"objective": "minimax", "base": "knn:encoder=minilm+lm"}),
    "guarded knn minilm+lm+tfidf pls 16 (minimax)": ("guarded", {"objective": "minimax", "base": "knn:encoder=minilm+lm+tfidf:project=16"}),
    "guarded knn minilm+lm+tfidf pls 16 pca 128 (minimax)": ("guarded", {"objective": "minimax", "base": "knn:encoder=minilm+lm+tfidf:project=16:reduce=128"}),
    "guarded knn minilm+lm+tfidf pls 16 (safe)": ("guarded", {"base": "knn:encoder=minilm+lm+tfidf:project=16"}),
    "guarded ensemble (hard similarity q0.3 fixed)": ("guarded", {"mode": "hard", "select": False, "statistic": "similarity", "low": 0.3, "high": 0.3}),
}


def _gap_row(name: str, evs: list[dict]) -> dict:
    gaps = np.array([e["gap_closed"] for e in evs])
    # Pooled over seeds: mean of per-seed bootstrap bounds (each interval from 1000 resamples of that seed's test set).
    return {
        "router": name,
        "accuracy": float(np.mean([e["accuracy"] for e in evs])),
        "best_single": float(np.mean([e["best_single"] for e in evs])),
        "oracle": float(np.mean([e["oracle"] for e in evs])),
        "delta": float(np.mean([e["delta"] for e in evs])),
        "delta_low_min": float(np.min([e["delta_low"] for e in evs])),
        "delta_low_mean": float(np.mean([e["delta_low"] for e in evs])),
        "gap_closed": float(gaps.mean()),
        "gap_closed_sd": float(gaps.std()),
        "gap_closed_low_mean": float(np.mean([e["gap_closed_low"] for e in evs])),
        "seeds_delta_ci_above_zero": int(sum(e["delta_low"] > 0 for e in evs)),
    }


def quality_core(seeds: int) -> dict:
    """The ensemble and its members over all seeds, training each member once per seed
    (the ensemble's prediction is the members' average, exactly as EnsembleRouter computes it)."""
    from routers.learned import EnsembleRouter

    table = from_llmrouter()
    members = {"knn (minilm, k=100)": ("knn", {}), "subject (cluster 32)": ("subject", {"mode": "cluster", "clusters": 32}), "logreg (minilm)": ("logreg", {"encoder": "minilm"})}
    per: dict[str, list[dict]] = {k: [] for k in ["best-single", *members, "ensemble", "partition"]}
    for seed in range(seeds):
        tr, te = table.split(0.2, seed)
        fitted = [make_router(key, seed=seed, **opts).fit(tr) for key, opts in members.values()]
        preds = {}
        part = make_router("partition", seed=seed).fit(tr)  # selects its grid on a validation split of tr
        preds["partition"] = part.predict(te.prompts)
        chosen = part.config
        print(f"seed {seed} partition chose view={chosen.view} clusters={list(chosen.clusters)} smoothing={chosen.smoothing}", file=sys.stderr, flush=True)
        for name, r in zip(members, fitted):
            preds[name] = r.predict(te.prompts)
        preds["best-single"] = make_router("best-single").fit(tr).predict(te.prompts)
        preds["ensemble"] = EnsembleRouter(members=fitted).fit(tr).predict(te.prompts)
        for name, p in preds.items():
            ev = evaluate(te, p, n_boot=1000, seed=seed).data
            per[name].append(ev)
            print(f"seed {seed} {name:28s} acc {ev['accuracy']:.4f} best {ev['best_single']:.4f} gap {ev['gap_closed']:+.3f} delta_low {ev['delta_low']:+.4f}", file=sys.stderr, flush=True)
    return {"rows": [_gap_row(n, evs) | {"seeds": len(evs)} for n, evs in per.items()]}


def quality(seeds: int, bert: bool, only: list[str] | None = None, first_seed: int = 0) -> dict:
    table = from_llmrouter()
    routers = {k: v for k, v in ROUTERS.items() if not only or k in only}
    if bert:
        routers["bert (MiniLM fine-tuned)"] = ("bert", {})
    per: dict[str, list[dict]] = {k: [] for k in routers}
    times: dict[str, float] = {k: 0.0 for k in routers}
    for seed in range(first_seed, first_seed + seeds):
        tr, te = table.split(0.2, seed)
        for name, (key, opts) in routers.items():
            if key == "bert" and seed > first_seed:
                continue
            t0 = time.perf_counter()
            r = make_router(key, seed=seed, **opts).fit(tr)
            ev = evaluate(te, r.predict(te.prompts), n_boot=1000, seed=seed).data
            times[name] += time.perf_counter() - t0
            if key == "partition":
                ev["chosen"] = {"view": r.config.view, "clusters": list(r.config.clusters), "smoothing": r.config.smoothing}
            if key == "guarded":
                _, notes = r.explain(te.prompts)
                ev["chosen"] = _guard_info(r) | {"guarded_share": float(np.mean([n.get("weight", 1.0) < 1.0 for n in notes]))}
            per[name].append(ev)
            print(f"seed {seed} {name:28s} acc {ev['accuracy']:.4f} best {ev['best_single']:.4f} gap {ev['gap_closed']:+.3f} delta_low {ev['delta_low']:+.4f} {ev.get('chosen', '')}", file=sys.stderr, flush=True)
    rows = [_gap_row(n, evs) | {"fit_predict_s": times[n] / max(1, len(evs)), "seeds": len(evs), "per_seed_gap_closed": [e["gap_closed"] for e in evs], "chosen": [e.get("chosen") for e in evs]} for n, evs in per.items() if evs]
    # Pooled paired bootstrap over all seeds' test predictions is what 'delta_low_pooled' reports.
    return {"rows": rows, "table": table.summary()}


def _guard_info(r) -> dict:
    """What a guarded router chose on its training table (statistic, quantiles, thresholds)."""
    if r.key != "guarded":
        return {}
    c = r.config
    g = r.meta.get("guard", {})
    return {"mode": c.mode, "statistic": c.statistic, "low": c.low, "high": c.high, "thresholds": [float(v) for v in r.thresholds], "calibration_score": g.get("chosen", {}).get("score"), "calibration_off_score": g.get("off", {}).get("score")}


def loto(seed: int = 0, routers: tuple[str, ...] = ("ensemble", "partition")) -> list[dict]:
    """Train on every task but one, test on the held-out task. The reference is the expert
    that was best on the *training* tasks (what a fixed choice made without the task would
    do); 'test_best_single' (best on the held-out task itself) is shown for context.
    Routers are 'key', 'key:option=value:...' (e.g. 'guarded:base=ensemble'), 'auto'
    (``--router auto``, choosing on the training tasks only) or a name of
    the quality table's ROUTERS (e.g. 'guarded knn minilm+lm (minimax)'); every
    router after the first is also compared with the first (paired, same queries)."""
    from collab.stats import bootstrap_ci
    from routers.learned import parse_member
    from routers.metrics import routed_scores

    table = from_llmrouter()
    out = []
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in routers}
    routed_all: dict[str, list[np.ndarray]] = {k: [] for k in routers}
    for task, tr, te in table.leave_one_task_out():
        fixed = te.scores[:, int(tr.scores.mean(0).argmax())]
        row: dict = {"task": task, "queries": len(te), "train_best_single": float(fixed.mean()), "test_best_single": float(te.scores.mean(0).max()), "oracle": float(te.scores.max(1).mean())}
        for spec in routers:
            key, opts = ROUTERS[spec] if spec in ROUTERS else parse_member(spec)
            opts = dict(opts)
            t0 = time.perf_counter()
            if spec == "auto":  # --router auto, choosing on the six training tasks only
                from routers.auto import select_router

                r = select_router(tr, seed=seed)
                print(f"loto {task:12s} auto chose {r.meta['auto']['chosen']}", file=sys.stderr, flush=True)
            else:
                r = make_router(key, seed=seed, **opts).fit(tr)
            if key == "guarded":
                pred, notes = r.explain(te.prompts)
                guarded_share = float(np.mean([n.get("weight", 1.0) < 1.0 for n in notes]))
            else:
                pred, guarded_share = r.predict(te.prompts), None
            routed = routed_scores(te, pred.argmax(1))
            m, lo, hi = bootstrap_ci(routed - fixed, 1000, seed=seed)
            row[spec] = {"accuracy": float(routed.mean()), "delta": m, "delta_low": lo, "delta_high": hi, "fit_predict_s": time.perf_counter() - t0}
            if guarded_share is not None:
                row[spec] |= {"guarded_share": guarded_share, "guard": _guard_info(r)}
            if spec != routers[0]:
                m2, lo2, hi2 = bootstrap_ci(routed - routed_all[routers[0]][-1], 1000, seed=seed)
                row[spec] |= {f"vs_{routers[0]}": {"delta": m2, "delta_low": lo2, "delta_high": hi2}}
            diffs[spec].append(routed - fixed)
            routed_all[spec].append(routed)
            extra = f" guarded {guarded_share:.0%} {_guard_info(r)}" if guarded_share is not None else ""
            print(f"loto {task:12s} n={len(te)} fixed {fixed.mean():.4f} {spec} {routed.mean():.4f} delta {m:+.4f} [{lo:+.4f}, {hi:+.4f}]{extra}", file=sys.stderr, flush=True)
        out.append(row)
    # Pooled over all held-out tasks (each query once): the overall verdict.
    for spec in routers:
        m, lo, hi = bootstrap_ci(np.concatenate(diffs[spec]), 1000, seed=seed)
        pooled = {"task": "ALL (pooled)", "router": spec, "queries": len(table), "accuracy": float(np.concatenate(routed_all[spec]).mean()), "delta": m, "delta_low": lo, "delta_high": hi}
        if spec != routers[0]:
            m2, lo2, hi2 = bootstrap_ci(np.concatenate(routed_all[spec]) - np.concatenate(routed_all[routers[0]]), 1000, seed=seed)
            pooled[f"vs_{routers[0]}"] = {"delta": m2, "delta_low": lo2, "delta_high": hi2}
        out.append(pooled)
        print(f"loto pooled {spec} delta {m:+.4f} [{lo:+.4f}, {hi:+.4f}]", file=sys.stderr, flush=True)
    return out


#: Rows of the shift-aware table: name -> (key, options). LM-encoder rows are left out (SmolLM2
#: over 5,608 prompts is ~40 min on this CPU); their figures are in the random-split table.
SHIFT_ROUTERS = {
    "best-single": ("best-single", {}),
    "knn (tfidf, k=40)": ("knn", {"encoder": "tfidf", "k": 40}),
    "knn (minilm, k=100)": ("knn", {}),
    "knn (minilm+tfidf, k=100)": ("knn", {"encoder": "minilm+tfidf"}),
    "knn (minilm+tfidf, pls 16, pca 128)": ("knn", {"encoder": "minilm+tfidf", "project": 16, "reduce": 128}),
    "mlp (minilm+tfidf, default)": ("mlp", {}),
    "partition (grid chosen on validation, default)": ("partition", {}),
    "partition (select=false)": ("partition", {"select": False}),
    "classifier (MLP 128-64 on minilm, ties to best mean)": ("classifier", {}),
    "classifier (ties to first listed)": ("classifier", {"ties": "first"}),
    "ensemble (partition select=false + knn pls 16)": ("ensemble", {"members": ("partition:select=false", "knn:encoder=minilm+tfidf:project=16:reduce=128")}),
}


def shift(seeds: tuple[int, ...] = (1, 2, 3), routers: tuple[str, ...] = tuple(SHIFT_ROUTERS), auto: bool = True) -> dict:
    """Shift-aware figures beside the random-split ones, for every router row and for
    ``--router auto`` (nested: it selects on each outer training part only).

    Per seed: a random 80/20 split stratified by task; a grouped 80/20 split (one fold of
    ``routers.auto.grouped_folds`` over near-duplicate groups, MiniLM cosine >= 0.9, so no
    near-duplicate spans the two sides); the grouped test part reweighted to the tilted
    task mixes (each task in turn given half the weight; mean and worst over mixes).
    Figures: share of the best-single-to-oracle gap closed, best single chosen on the
    (weighted) test rows, as ``route eval`` does."""
    from routers.auto import (
        gap_closed,
        grouped_folds,
        near_duplicate_groups,
        select_router,
        tilted_mixes,
    )
    from routers.encoders import minilm

    table = from_llmrouter()
    groups = near_duplicate_groups(minilm().encode(table.prompts), 0.9)
    names = [*routers] + (["auto"] if auto else [])
    per: dict[str, dict[str, list]] = {n: {"random": [], "grouped": [], "reweighted": [], "reweighted_worst": [], "chosen": []} for n in names}
    for seed in seeds:
        splits = {"random": table.split(0.2, seed)}
        tr_i, te_i = grouped_folds(table.tasks, groups, 5, seed)[0]
        splits["grouped"] = (table.subset(tr_i), table.subset(te_i))
        for kind, (tr, te) in splits.items():
            mixes = tilted_mixes(te.tasks)
            for name in names:
                t0 = time.perf_counter()
                if name == "auto":
                    r = select_router(tr, seed=seed)
                    per[name]["chosen"].append({"split": kind, "seed": seed, "chosen": r.meta["auto"]["chosen"], "inner": {c["name"]: round(c["score"], 4) for c in r.meta["auto"]["candidates"]}})
                else:
                    key, opts = SHIFT_ROUTERS[name]
                    r = make_router(key, seed=seed, **opts).fit(tr)
                routed = te.scores[np.arange(len(te)), r.predict(te.prompts).argmax(axis=1)]
                per[name][kind].append(gap_closed(routed, te.scores))
                if kind == "grouped":
                    g = [gap_closed(routed, te.scores, w) for _, w in mixes]
                    per[name]["reweighted"].append(float(np.mean(g)))
                    per[name]["reweighted_worst"].append(float(min(g)))
                extra = f" chose {per[name]['chosen'][-1]['chosen']}" if name == "auto" else ""
                print(f"shift seed {seed} {kind:8s} {name:52s} gap {per[name][kind][-1]:+.3f}" + (f" reweighted {per[name]['reweighted'][-1]:+.3f} worst {per[name]['reweighted_worst'][-1]:+.3f}" if kind == "grouped" else "") + f" {time.perf_counter() - t0:.0f}s{extra}", file=sys.stderr, flush=True)
    rows = []
    for n in names:
        row = {"router": n, "seeds": list(seeds)}
        for k in ("random", "grouped", "reweighted", "reweighted_worst"):
            row[k] = float(np.mean(per[n][k]))
            row[f"{k}_sd"] = float(np.std(per[n][k]))
            row[f"per_seed_{k}"] = per[n][k]
        if per[n]["chosen"]:
            row["chosen"] = per[n]["chosen"]
        rows.append(row)
    return {"rows": rows, "near_duplicate_rows": int((np.bincount(groups)[groups] > 1).sum())}


def adaptation(seed: int = 1, router: str = "partition:select=false", n: int = 800, draws: int = 10, pool: float = 0.2, sampling: str = "replacement") -> list[dict]:
    """``route adapt`` on simulated shifts of a random split's test part (a share ``pool`` of
    the table): gap closed before and after each method, averaged over ``draws`` samples of
    about ``n`` prompts per shift (the labels only score; the methods see the prompts'
    predictions).

    ``sampling='replacement'`` draws ``n`` rows with replacement, with probability
    proportional to the shift's weight: every sample then carries the test part's own
    deviation from the population, which fresh traffic would not. ``'exact'`` keeps each
    row independently with probability c x weight (c = min(n / total weight, 1 / largest
    weight)): a sample without replacement that is an exact draw from the reweighted
    population, at the price of fewer than ``n`` rows when one weight dominates (a small
    task given half the traffic); the mean size is reported. Columns: the base router; its
    predictions re-expressed under the sample's *true* rates (``adjust`` with the labels'
    means: what a perfect per-expert prior estimate would give, the ceiling of EM-style
    adaptation); the tilt's adjustment with the shift's own theta (known for every shift but
    a change of mix: the ceiling of the free tilt's adjustment); the EM (``--method em``,
    plain and the MAP default); ``--method tilt`` as the CLI runs it (the one-expert model
    first, then the free tilt) with the share of samples it applied to and the share the
    one-expert model took; and the free tilt alone (``--no-one-expert``), with and without
    its routing test."""
    from routers.adapt import (
        AdaptedRouterConfig,
        adjust,
        em_priors,
        tilt_adjust,
        tilt_apply,
        tilt_calibration,
        tilt_choose,
        tilt_estimate,
    )
    from routers.auto import gap_closed
    from routers.learned import parse_member

    if sampling not in ("replacement", "exact"):
        raise ValueError(f"--adapt-sampling: expected 'replacement' or 'exact', found {sampling!r}")
    table = from_llmrouter()
    tr, te = table.split(pool, seed)
    key, opts = parse_member(router)
    r = make_router(key, seed=seed, **opts).fit(tr)
    pri = tr.scores.mean(0)
    pred = r.predict(te.prompts)
    cal = tilt_calibration(r, tr, seed=seed)
    te_shape = cal.shape_of(te.prompts)
    rng = np.random.default_rng(seed)
    tasks = np.asarray(te.tasks)
    e = len(table.experts)

    def tilt_on(j: int, factor: float) -> np.ndarray:
        t = np.zeros(e)
        t[j] = np.log(factor)
        return t

    # (kind, name, row weights, the tilt theta that is that shift for binary scores; None for a change of mix)
    shifts: list[tuple[str, str, np.ndarray, np.ndarray | None]] = [("none", "none", np.ones(len(te)), np.zeros(e))]
    for task in sorted(set(te.tasks)):
        shifts.append(("task mix", f"half {task}", np.where(tasks == task, 0.5 / (tasks == task).mean(), 0.5 / (tasks != task).mean()), None))
    for beta in (2.0, 4.0):
        shifts.append(("label", f"harder (weight exp(-{beta:g} x mean score))", np.exp(-beta * te.scores.mean(1)), np.full(e, -beta / e)))
    best = int(pri.argmax())
    shifts.append(("label", f"{table.experts[best]} right less often (x0.3)", np.where(te.scores[:, best] > 0.5, 0.3, 1.0), tilt_on(best, 0.3)))
    for j in np.argsort(-pri)[1:4]:
        shifts.append(("label", f"{table.experts[j]} right more often (x3)", np.where(te.scores[:, j] > 0.5, 3.0, 1.0), tilt_on(int(j), 3.0)))
    out = []
    for kind, name, w, theta in shifts:
        acc: dict[str, list[float]] = {k: [] for k in ("base", "true_rates", "true_tilt", "em", "map", "tilt", "tilt_applied", "tilt_one_applied", "tilt_free", "tilt_free_applied", "true_change", "size", "tilt_moments_only", "tilt_moments_applied")}
        for _ in range(draws):
            if sampling == "exact":
                idx = np.flatnonzero(rng.random(len(te)) < min(n / w.sum(), 1.0 / w.max()) * w)
            else:
                idx = rng.choice(len(te), n, p=w / w.sum())
            s, p = te.scores[idx], pred[idx]

            def gap(q: np.ndarray, s: np.ndarray = s) -> float:
                return gap_closed(s[np.arange(len(s)), q.argmax(1)], s)

            ch = tilt_choose(p, te_shape[idx], cal, pri)
            est = ch["free"] if ch["free"] is not None else tilt_estimate(p, te_shape[idx], cal)  # the free tilt, also where the one-expert model applied
            acc["base"].append(gap(p))
            acc["true_rates"].append(gap(adjust(p, pri, s.mean(0))))
            acc["true_tilt"].append(gap(tilt_adjust(p, theta)) if theta is not None else float("nan"))
            acc["em"].append(gap(em_priors(p, pri)[1]))
            new_map, adj_map, _ = em_priors(p, pri, strength=float(len(tr)))
            acc["map"].append(gap(adj_map) if np.abs(new_map - pri).max() >= AdaptedRouterConfig.min_change else gap(p))
            acc["tilt"].append(gap(tilt_apply(p, ch, pri)))
            acc["tilt_applied"].append(float(ch["applied"]))
            acc["tilt_one_applied"].append(float(ch["model"] == "one expert"))
            acc["tilt_free"].append(gap(tilt_adjust(p, est["theta"])) if est["applied"] else gap(p))
            acc["tilt_free_applied"].append(float(est["applied"]))
            moments = est["passed"]["shape"] and est["passed"]["shift"]  # without the routing test
            acc["tilt_moments_only"].append(gap(tilt_adjust(p, est["theta"])) if moments else gap(p))
            acc["tilt_moments_applied"].append(float(moments))
            acc["true_change"].append(float(np.abs(s.mean(0) - pri).max()))
            acc["size"].append(float(len(idx)))
        row = {"kind": kind, "shift": name, **{k: float(np.mean(v)) for k, v in acc.items()}}
        out.append(row)
        print(f"adapt {kind:8s} {name:60s} true change {row['true_change']:.2f}  base {row['base']:+.3f}  true rates {row['true_rates']:+.3f}  true tilt {row['true_tilt']:+.3f}  EM {row['em']:+.3f}  MAP {row['map']:+.3f}  tilt {row['tilt']:+.3f} (applied {row['tilt_applied']:.0%}, one expert {row['tilt_one_applied']:.0%}; free tilt alone {row['tilt_free']:+.3f}, applied {row['tilt_free_applied']:.0%}; without the routing test {row['tilt_moments_only']:+.3f}, applied {row['tilt_moments_applied']:.0%})  size {row['size']:.0f}", file=sys.stderr, flush=True)
    return out


def _tilt_information(pred: np.ndarray, y: np.ndarray, n: int, folds: int = 5) -> dict:
    """How well unlabelled prompts can pin the new rates under label shift, when their only
    evidence of which experts are right is ``pred`` (per-row predictors, out of fold).

    Under the tilt p'(x) = p(x) E[exp(theta . y) | x] / Z the score of one prompt at theta = 0
    is E[y | x] - E[y], so the Fisher information per prompt is I = Cov(E[y | pred]), taken
    here as the covariance of y's least-squares projection on ``pred``; the rates move by
    Cov(y) d theta, so an unbiased estimate from ``n`` prompts has covariance at least
    V = Cov(y) I^-1 Cov(y) / n (Cramer-Rao). Returned: the largest per-expert standard error,
    the range over pairs of the four experts right most often of the standard error of their
    rates' difference (what decides routing between them), the mean rate's, one expert's when
    the others' tilts are known, and the smallest eigenvalue of I estimated cross-fitted
    (coefficients from the other folds, covariance with y): near zero or negative where the
    calibration rows cannot tell the direction from noise."""
    m = len(y)
    x = np.hstack([np.ones((m, 1)), pred])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    info = np.cov((x @ coef).T)
    cov_y = np.cov(y.T)
    v = cov_y @ np.linalg.solve(info, cov_y) / n
    top = np.argsort(-y.mean(0))[:4]
    pairs = [float(np.sqrt(v[a, a] + v[b, b] - 2 * v[a, b])) for i, a in enumerate(top) for b in top[i + 1:]]
    fold = np.random.default_rng(0).permutation(m) % folds
    cross = np.zeros_like(y)
    for k in range(folds):
        c, *_ = np.linalg.lstsq(x[fold != k], y[fold != k], rcond=None)
        cross[fold == k] = x[fold == k] @ c
    cc = (cross - cross.mean(0)).T @ (y - y.mean(0)) / (m - 1)
    u = np.full(y.shape[1], 1.0 / y.shape[1])
    one = np.sqrt(np.diag(cov_y) ** 2 / np.diag(info) / n)
    return {
        "rate_se_max": float(np.sqrt(np.diag(v).max())),
        "top4_difference_se": [min(pairs), max(pairs)],
        "mean_rate_se": float(np.sqrt(u @ v @ u)),
        "one_expert_se": [float(one.min()), float(one.max())],
        "r2": [float(np.min(np.diag(info) / np.diag(cov_y))), float(np.max(np.diag(info) / np.diag(cov_y)))],
        "min_eigenvalue_cross_fitted": float(np.linalg.eigvalsh((cc + cc.T) / 2).min()),
    }


def identifiability(seed: int = 1, routers: Sequence[str] = ("partition:select=false", "knn:encoder=minilm+tfidf:project=16:reduce=128"), pool: float = 0.5, n: int = 800) -> list[dict]:
    """The Cramer-Rao floor of ``route adapt``'s label-free rate estimate (``_tilt_information``)
    on one random split's training part (the share 1 - ``pool``), for ``n`` new prompts:
    with the first router's out-of-fold predictions (as ``--method tilt`` uses them), with
    every router's side by side, and with the first router's plus as many columns of
    Gaussian noise as the others add (an in-sample projection gains from any extra column;
    a predictor that carries information must beat noise)."""
    from routers.adapt import tilt_calibration
    from routers.learned import parse_member

    tr, _ = from_llmrouter().split(pool, seed)
    preds, y = [], None
    for spec in routers:
        key, opts = parse_member(spec)
        cal = tilt_calibration(make_router(key, seed=seed, **opts).fit(tr), tr, seed=seed)
        preds.append(cal.oof)
        y = cal.y
    assert y is not None
    extra = sum(p.shape[1] for p in preds[1:])
    rows = [(routers[0], preds[0])]
    if extra:
        rows += [(" + ".join(routers), np.hstack(preds)), (f"{routers[0]} + {extra} noise columns", np.hstack([preds[0], np.random.default_rng(seed).normal(size=(len(y), extra))]))]
    out = []
    for name, pr in rows:
        row = {"seed": seed, "predictors": name, "prompts": n, **_tilt_information(pr, y, n)}
        out.append(row)
        print(f"identifiability seed {seed} {name}: R2 {row['r2'][0]:.3f}-{row['r2'][1]:.3f}; SE at {n} prompts: largest rate {row['rate_se_max']:.3f}, "
              f"difference of two of the top four {row['top4_difference_se'][0]:.3f}-{row['top4_difference_se'][1]:.3f}, mean rate {row['mean_rate_se']:.3f}, "
              f"one expert alone {row['one_expert_se'][0]:.3f}-{row['one_expert_se'][1]:.3f}; smallest eigenvalue of I cross-fitted {row['min_eigenvalue_cross_fitted']:+.5f}", file=sys.stderr, flush=True)
    return out


def routellm(seeds: int, keys: tuple[str, ...] = ("knn", "logreg", "mf", "partition", "random"), tables: tuple[str, ...] = ("gsm8k", "mmlu")) -> list[dict]:
    out = []
    for name, loader, encoders in [("gsm8k", from_routellm_gsm8k, ["minilm", "tfidf"]), ("mmlu", from_routellm_mmlu, ["tfidf"])]:
        if name not in tables:
            continue
        table = loader()
        for enc in encoders:
            for key in keys:
                evs = []
                for seed in range(seeds):
                    tr, te = table.split(0.2, seed)
                    opts = {} if key == "random" else {"encoder": enc}
                    r = make_router(key, seed=seed, **opts).fit(tr)
                    evs.append(evaluate(te, r.predict(te.prompts), n_boot=200, seed=seed).data)
                if key == "random" and enc != encoders[0]:
                    continue
                row = {"table": name, "router": key if key == "random" else f"{key} ({enc})", "apgr": float(np.mean([e["apgr"] for e in evs])), "apgr_sd": float(np.std([e["apgr"] for e in evs])), "cpt50": float(np.mean([e["cpt50"] for e in evs])), "cpt80": float(np.mean([e["cpt80"] for e in evs])), "strong": evs[0]["strong"]}
                out.append(row)
                print(f"routellm {name} {row['router']:16s} APGR {row['apgr']:.3f} CPT50 {row['cpt50']:.1%} CPT80 {row['cpt80']:.1%}", file=sys.stderr, flush=True)
    return out


def latency(n: int = 60, device: str = "cpu", minilm_model: str = "zoo:minilm-l6", table_path: str | None = None, only: Sequence[str] = ()) -> dict:
    """Decision latency at batch 1 on fresh prompts. Each router's end-to-end figure
    includes its own MiniLM (or TF-IDF) encoding: every timed call uses a prompt no
    router has seen, so the embedding cache cannot answer it. The raw
    sentence-transformers forward is timed interleaved with each router (same
    prompt length, fresh prompts), so drift in machine load hits both alike; the
    overhead is the median of the paired differences.

    ``device`` runs MiniLM there (the heads stay NumPy); on a device other than the CPU
    the embeddings and every router's choices are also compared with the CPU's."""
    from routers.encoders import MiniLMEncoder, minilm

    table = from_llmrouter(table_path)
    tr, _ = table.split(0.2, 0)
    enc = minilm(minilm_model).to(device)
    if minilm_model != "zoo:minilm-l6":
        import routers.encoders as encoders

        # Routers built below ask for the zoo's MiniLM by name; a machine without the zoo
        # package (a GPU box) gives them this copy of the same weights instead.
        encoders._MINILM[("zoo:minilm-l6", 256)] = enc
    words = "Consider the following question about the history and the science of numbers and explain".split()
    run = f"r{time.time_ns() % 10**9}"  # embeddings are cached on disk by content: no prompt of an earlier run may repeat

    def prompt(i: int) -> str:
        return run + " " + " ".join(f"{words[(i + j) % len(words)]}{i}" if j % 7 == 0 else words[(i + j) % len(words)] for j in range(149))

    ntok = len(enc.model.tokenizer(prompt(0)).input_ids)
    res: dict = {"prompt_tokens": ntok, "device": device}
    cpu_enc = MiniLMEncoder(minilm_model, cache=False) if device != "cpu" else None

    def once(fn, arg) -> float:
        t0 = time.perf_counter()
        fn(arg)
        return (time.perf_counter() - t0) * 1e3

    enc.encode_uncached([prompt(-1)])  # warm-up
    raw_all = np.array([once(enc.encode_uncached, [prompt(10_000 + i)]) for i in range(n)])
    # The floor for batching: the raw forward of 64 fresh prompts in one call, per prompt.
    raw_batch = [once(enc.encode_uncached, [prompt(20_000 + 100 * r + i) for i in range(64)]) / 64 for r in range(3)]
    res["raw_minilm_ms"] = {"p50": float(np.percentile(raw_all, 50)), "p99": float(np.percentile(raw_all, 99)), "batch64_per_query": float(np.median(raw_batch))}
    print(f"latency raw MiniLM forward p50 {res['raw_minilm_ms']['p50']:.2f} ms p99 {res['raw_minilm_ms']['p99']:.2f} ms ({ntok} tokens); "
          f"batch of 64 {res['raw_minilm_ms']['batch64_per_query']:.2f} ms per prompt", file=sys.stderr, flush=True)
    builders = {
        "knn (minilm)": lambda: make_router("knn", seed=0).fit(tr),
        "logreg (minilm)": lambda: make_router("logreg", encoder="minilm").fit(tr),
        "mf (minilm)": lambda: make_router("mf").fit(tr),
        "subject (cluster)": lambda: make_router("subject", mode="cluster", clusters=32).fit(tr),
        "ensemble": lambda: make_router("ensemble").fit(tr),
        "partition": lambda: make_router("partition").fit(tr),
        # The supervised projection's own cost (the LM encoder's is reported separately: 450 ms).
        "knn (minilm+tfidf, pls 16)": lambda: make_router("knn", encoder="minilm+tfidf", project=16).fit(tr),
        "knn (minilm+tfidf, pls 16, pca 128)": lambda: make_router("knn", encoder="minilm+tfidf", project=16, reduce=128).fit(tr),
        # The best router's own features (MiniLM + SmolLM2 + TF-IDF): its encoder is SmolLM2 to layer 30
        # beside MiniLM, so only its head is compared with the 1 ms budget.
        "knn (minilm+lm+tfidf, pls 16)": lambda: make_router("knn", encoder="minilm+lm+tfidf", project=16).fit(tr),
        "knn (minilm+lm+tfidf, pls 16, pca 128)": lambda: make_router("knn", encoder="minilm+lm+tfidf", project=16, reduce=128).fit(tr),
        "guarded knn (minilm+lm+tfidf, pls 16, pca 128), minimax": lambda: make_router("guarded", objective="minimax", base="knn:encoder=minilm+lm+tfidf:project=16:reduce=128").fit(tr),
        "knn (tfidf)": lambda: make_router("knn", encoder="tfidf", k=10).fit(tr),
        "logreg (tfidf)": lambda: make_router("logreg", encoder="tfidf").fit(tr),
        # What `--router auto` chose on eight of twelve outer training parts of LLMRouter (seeds
        # 1-6; routers/auto.py CANDIDATES), and partition with select=false, its other choice.
        "auto's ensemble (partition select=false + knn minilm+tfidf, pls 16, pca 128)": lambda: make_router("ensemble", members=("partition:select=false", "knn:encoder=minilm+tfidf:project=16:reduce=128")).fit(tr),
        "partition (select=false)": lambda: make_router("partition", select=False).fit(tr),
    }
    unknown = sorted(set(only) - set(builders))
    if unknown:
        raise SystemExit(f"--latency-routers: unknown {unknown}; expected some of {sorted(builders)}")
    routers = {k: build() for k, build in builders.items() if not only or k in only}
    check = [prompt(900_000 + i) for i in range(64)]
    if cpu_enc is not None:
        diff = float(np.abs(enc.encode_uncached(check) - cpu_enc.encode_uncached(check)).max())
        res["embedding_max_abs_diff_vs_cpu"] = diff
        print(f"latency {device} vs cpu: embeddings of 64 prompts differ by at most {diff:.2e}", file=sys.stderr, flush=True)
    for r_i, (name, r) in enumerate(routers.items()):
        base = 100_000 * (r_i + 1)  # prompts of this router only: never cached by an earlier one
        if cpu_enc is not None and r.encoder is enc:
            same = r.predict_features(enc.encode_uncached(check), check).argmax(1) == r.predict_features(cpu_enc.encode_uncached(check), check).argmax(1)
            res.setdefault("same_choice_as_cpu", {})[name] = float(same.mean())
        enc_json = json.dumps([c.config_json().get("encoder") for c in (r, *r.children())])
        # Interleave the raw MiniLM forward where MiniLM is the router's whole neural encoder.
        uses_minilm = ("minilm" in enc_json and '"lm"' not in enc_json) or r.key in ("ensemble", "partition")
        r.predict([prompt(base - 1)])  # warm-up (first call builds lazy state)
        end, raw = [], []
        for i in range(n):
            end.append(once(r.predict, [prompt(base + i)]))
            if uses_minilm:
                raw.append(once(enc.encode_uncached, [prompt(base + 50_000 + i)]))
        end_a = np.array(end)
        x = r.features([prompt(base)])
        head = np.array([once(lambda p: r.predict_features(x, p), [prompt(base)]) for _ in range(200)])
        head_prompts = [prompt(base + 80_000 + i) for i in range(64)]
        x64 = r.features(head_prompts)
        head64 = min(once(lambda p: r.predict_features(x64, p), head_prompts) for _ in range(5)) / 64
        batch_prompts = [prompt(base + 90_000 + i) for i in range(64)]
        t0 = time.perf_counter()
        r.predict(batch_prompts)
        per_q_batch = (time.perf_counter() - t0) * 1e3 / 64
        row = {"p50": float(np.percentile(end_a, 50)), "p99": float(np.percentile(end_a, 99)), "router_only_p50": float(np.percentile(head, 50)), "router_only_p99": float(np.percentile(head, 99)), "batch64_per_query": per_q_batch, "batch_speedup": float(np.percentile(end_a, 50) / per_q_batch), "router_only_batch64_per_query": head64, "router_only_batch_speedup": float(np.percentile(head, 50) / head64)}
        if raw:
            raw_a = np.array(raw)
            row |= {"raw_p50": float(np.percentile(raw_a, 50)), "raw_p99": float(np.percentile(raw_a, 99)), "overhead_p50": float(np.median(end_a - raw_a))}
        res[name] = row
        extra = f" raw (interleaved) p50 {row['raw_p50']:.2f} ms, overhead {row['overhead_p50']:+.2f} ms" if raw else ""
        print(f"latency {name:18s} p50 {row['p50']:.2f} ms p99 {row['p99']:.2f} router-only p50 {row['router_only_p50']:.3f} ms (batch64 {head64:.4f} ms/q) batch64 {per_q_batch:.2f} ms/q{extra}", file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="quality splits use seeds first-seed .. first-seed+seeds-1 (e.g. 5 with --seeds 10 for splits kept apart from the reported 0-4)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--core", action="store_true", help="quality of the ensemble and its members only (all seeds), the rest skipped")
    ap.add_argument("--skip-loto", action="store_true")
    ap.add_argument("--skip-routellm", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--bert", action="store_true", help="also fine-tune the bert router (seed 0 only; slow on CPU)")
    ap.add_argument("--loto-routers", default="ensemble,partition")
    ap.add_argument("--loto-seed", type=int, default=0, help="seed of the leave-one-task-out fits (in-distribution folds, bootstrap)")
    ap.add_argument("--routellm-routers", default="knn,logreg,mf,partition,random")
    ap.add_argument("--routellm-tables", default="gsm8k,mmlu", help="comma-separated subset of gsm8k,mmlu")
    ap.add_argument("--only", default="", help="router names of the quality table, joined by ',' (or by ';' when a name holds a comma), e.g. 'best-single,partition'")
    ap.add_argument("--latency-n", type=int, default=60, help="timed single-prompt calls per router")
    ap.add_argument("--latency-routers", default="", help="';'-separated names of the latency rows to time (default: all)")
    ap.add_argument("--device", default="cpu", help="where MiniLM runs in the latency part: cpu, cuda, auto")
    ap.add_argument("--minilm", default="zoo:minilm-l6", help="sentence-transformers directory for the latency part (default: the zoo's MiniLM)")
    ap.add_argument("--table", default=None, help="LLMRouter train.json for the latency part (default: the copy shipped in routers/data/routing/llmrouter/)")
    ap.add_argument("--shift", action="store_true", help="shift-aware figures: random, grouped and reweighted-mix gap closed per router, and --router auto (nested)")
    ap.add_argument("--shift-seeds", default="1,2,3")
    ap.add_argument("--shift-routers", default="", help="names of SHIFT_ROUTERS joined by ';' (default all)")
    ap.add_argument("--no-auto", action="store_true", help="leave --router auto out of the shift table")
    ap.add_argument("--adapt", default="", help="route adapt on simulated shifts around this router spec, e.g. 'partition:select=false'")
    ap.add_argument("--adapt-seeds", default="1", help="comma-separated seeds of the random splits for --adapt (tilt's defaults were chosen on 1 and 2)")
    ap.add_argument("--adapt-pool", type=float, default=0.2, help="share of the table held out as the pool the shifted samples are drawn from")
    ap.add_argument("--adapt-n", type=int, default=800, help="prompts per shifted sample (with --adapt-sampling exact: at most; fewer where one weight dominates)")
    ap.add_argument("--adapt-sampling", default="replacement", choices=["replacement", "exact"], help="'exact': each pool row kept independently with probability proportional to its weight (no resampling artefact; smaller samples)")
    ap.add_argument("--identifiability", default="", help="comma-separated seeds: the Cramer-Rao floor of route adapt's rate estimate from the routers' out-of-fold predictions (--adapt-pool, --adapt-n)")
    ap.add_argument("--out", default="runs/bench-routers.json")
    a = ap.parse_args()
    out: dict = {}
    if not a.skip_latency:
        out["latency" if a.device == "cpu" else f"latency_{a.device}"] = latency(a.latency_n, device=a.device, minilm_model=a.minilm, table_path=a.table, only=[x for x in a.latency_routers.split(";") if x])
    if a.core:
        out["quality_core"] = quality_core(a.seeds)
    elif not a.skip_quality:
        out["quality" if a.first_seed == 0 else f"quality_seeds_{a.first_seed}_{a.first_seed + a.seeds - 1}"] = quality(a.seeds, a.bert, [x for x in a.only.split(";" if ";" in a.only else ",") if x], a.first_seed)
    if not a.skip_loto:
        out["loto"] = loto(seed=a.loto_seed, routers=tuple(x for x in a.loto_routers.split(";" if ";" in a.loto_routers else ",") if x.strip()))
    if not a.skip_routellm:
        out["routellm"] = routellm(a.seeds, tuple(a.routellm_routers.split(",")), tuple(a.routellm_tables.split(",")))
    if a.shift:
        out["shift"] = shift(tuple(int(x) for x in a.shift_seeds.split(",")), tuple(x for x in a.shift_routers.split(";") if x) or tuple(SHIFT_ROUTERS), not a.no_auto)
    if a.adapt:
        out.setdefault("adapt", {})[a.adapt] = {f"seed {sd}": adaptation(seed=int(sd), router=a.adapt, n=a.adapt_n, pool=a.adapt_pool, sampling=a.adapt_sampling) for sd in a.adapt_seeds.split(",")}
    if a.identifiability:
        out["identifiability"] = [row for sd in a.identifiability.split(",") for row in identifiability(seed=int(sd), pool=a.adapt_pool, n=a.adapt_n)]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    prev.update(out)
    Path(a.out).write_text(json.dumps(prev, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
