"""A new expert from a few demonstrations (L2D-Pop, ``--router population``): system accuracy
of a router that adds the expert from N <= 50 rows against one that knows it only through
the same N rows, and against routers retrained with all of its labels.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/population.py

**LLMRouter** (nine models, 5,608 queries): one stratified 80/20 split by query (seed 0).
Each model in turn is the *new* expert: it is removed from the training part, the routers
are trained on the other eight, and the new expert comes in from N rows of the training
part (N in 10, 20, 50; five draws of rows per N, seeds 100-104). Every system routes each
test query among all nine models with the best-quality policy; the figure is the mean score
of the chosen model (system accuracy), and the share of the gap between the best single
model (best on the training part) and the per-query oracle that it closes.

- ``population``: ``--router population`` (attention pooling) meta-trained on the eight; the
  new expert is added with ``add_context`` from the N rows, no weight changed (the same code
  as ``collab route add-expert``). ``population (mean)``: mean pooling. ``+ pseudo``: the
  context enlarged with ``--pseudo`` pseudo-labelled training queries (label spreading).
- ``knn, N rows (demo mean)``: what a user can do today. ``KNNRouter`` (MiniLM, k = 100, the
  default) fitted on the training part with the eight models' scores; the new expert's
  predicted score for a query is the mean of its scores over the min(k, N) demonstration rows
  most similar to the query, i.e. a kNN fitted on the N rows for that column alone. As
  k = 100 > N, this is the mean of the N scores for every query. ``knn, N rows (k=10)``: the
  same with the 10 nearest demonstrations for the new column (the zoo router's k).
- ``population retrained`` / ``knn retrained``: trained on the training part with all nine
  models' scores (every label of the new expert): what the issue calls the router retrained
  with all of the new expert's labels. ``... old experts only``: the eight, no new expert.

**The zoo**: the routers are trained on ``examples/routing/zoo-dev.jsonl`` (60 dev questions)
without ``units`` (smol-units) and tested on ``examples/routing/zoo-mixed.jsonl`` (150 test
questions, all five experts); ``units`` comes in from N = 20 or 50 rows of the dev table (five
draws each). The kNN is the shipped zoo router's (MiniLM, k = 10).

Intervals: 95% percentile bootstrap over test queries (1,000 resamples) of the per-query
routed score averaged over draws (and over held-out models for the averages); differences
are paired (same queries). Results go to ``runs/bench-population.json``; a rerun reuses every
held-out model already there (``--fresh`` to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for bench.common
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from bench.common import log
from collab.stats import bootstrap_ci
from routers.base import make_router
from routers.metrics import paired_bootstrap, routed_scores
from routers.table import RoutingTable, from_llmrouter, load_table

DRAW_SEEDS = (100, 101, 102, 103, 104)


def knn_new_column(
    x_new: np.ndarray, x_demo: np.ndarray, y_demo: np.ndarray, k: int
) -> np.ndarray:
    """The new expert's kNN score for each query: the mean of its scores on the min(k, N)
    demonstrations most similar (cosine of the router's features) to the query."""
    from routers.encoders import normalise_rows

    k = min(k, len(y_demo))
    sims = normalise_rows(x_new) @ normalise_rows(x_demo).T  # (n, N)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return y_demo[top].mean(axis=1)


def with_new_expert(
    pop: Any,
    p_old: np.ndarray,
    x_test: np.ndarray,
    x_demo: np.ndarray,
    y_demo: np.ndarray,
    pseudo: int,
) -> np.ndarray:
    """(n, E + 1): the population router's scores for the known experts and for the new
    one, known by its demonstrations (plus ``pseudo`` pseudo-labelled training queries)."""
    cx, cy = x_demo, y_demo
    if pseudo:
        rows, labels = pop.pseudo_pool(x_demo, y_demo, pseudo)
        cx, cy = (
            np.concatenate([x_demo, pop.ctx_x[rows]]),
            np.concatenate([y_demo, labels]),
        )
    return np.column_stack([p_old, pop.context_scores(x_test, cx, cy)])


def run_unit(
    train: RoutingTable,
    test: RoutingTable,
    new: str,
    ns: tuple[int, ...],
    draws: tuple[int, ...],
    pop_opts: dict[str, Any],
    knn_opts: dict[str, Any],
    pseudo: int,
    poolings: tuple[str, ...],
) -> dict[str, Any]:
    """One held-out expert: per method and N, the per-query routed score (mean over draws) on
    ``test``, with every expert of the table (``new`` last) in the routed system."""
    old = [e for e in train.experts if e != new]
    order = [*old, new]
    te = test.select_experts(order)
    tr_old = train.select_experts(old)
    j_new = train.experts.index(new)
    out: dict[str, Any] = {"routed": {}, "share_new": {}, "fit_s": {}}
    rows = np.arange(len(te))

    def keep(name: str, n: int | None, pred_fn: Callable[[int], np.ndarray]) -> None:
        per, share = [], []
        for seed in draws if n is not None else (None,):
            pred = pred_fn(seed)
            choice = pred.argmax(1)
            per.append(te.scores[rows, choice])
            share.append(float((choice == len(old)).mean()))
        key = _key(name, n)
        out["routed"][key] = np.mean(per, axis=0).round(4).tolist()
        out["share_new"][key] = float(np.mean(share))

    def demo_rows(n: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).choice(
            len(train), size=min(n, len(train)), replace=False
        )

    t0 = time.perf_counter()
    knn = make_router("knn", **knn_opts).fit(tr_old)
    x_te, x_tr = knn.features(te.prompts), knn.features(train.prompts)
    p_knn = knn.predict_features(x_te, te.prompts)
    out["fit_s"]["knn"] = time.perf_counter() - t0
    keep(
        "knn, old experts only",
        None,
        lambda _: np.column_stack([p_knn, np.full(len(te), -1.0)]),
    )
    for n in ns:
        for label, k in (("demo mean", knn.config.k), ("k=10", 10)):
            keep(
                f"knn, N rows ({label})",
                n,
                lambda s, n=n, k=k: np.column_stack(
                    [
                        p_knn,
                        knn_new_column(
                            x_te,
                            x_tr[demo_rows(n, s)],
                            train.scores[demo_rows(n, s), j_new],
                            k,
                        ),
                    ]
                ),
            )
    for pooling in poolings:
        name = "population" if pooling == "attention" else f"population ({pooling})"
        t0 = time.perf_counter()
        pop = make_router("population", pooling=pooling, **pop_opts).fit(tr_old)
        out["fit_s"][name] = time.perf_counter() - t0
        log(
            f"  {new}: {name} meta-trained in {out['fit_s'][name]:.0f} s (best step {pop.meta['meta_training']['best_step']})"
        )
        xp_te, xp_tr = pop.features(te.prompts), pop.features(train.prompts)
        p_old = pop.predict_features(xp_te, te.prompts)
        keep(
            f"{name}, old experts only",
            None,
            lambda _, p=p_old: np.column_stack([p, np.full(len(te), -1.0)]),
        )
        variants = [(name, 0)] + (
            [(f"{name} + {pseudo} pseudo-labels", pseudo)]
            if pseudo and pooling == "attention"
            else []
        )
        for n in ns:
            for label, pseudo_n in variants:
                keep(
                    label,
                    n,
                    lambda s, n=n, q=pseudo_n, r=pop, p=p_old, xq=xp_te, xd=xp_tr: (
                        with_new_expert(
                            r,
                            p,
                            xq,
                            xd[demo_rows(n, s)],
                            train.scores[demo_rows(n, s), j_new],
                            q,
                        )
                    ),
                )
    return out


def run_retrained(
    train: RoutingTable,
    test: RoutingTable,
    pop_opts: dict[str, Any],
    knn_opts: dict[str, Any],
    poolings: tuple[str, ...],
) -> dict[str, list[float]]:
    """Per-query routed score of the routers trained with every expert's labels (expert order of ``train``)."""
    te = test.select_experts(train.experts)
    rows = np.arange(len(te))
    out = {
        "knn retrained (all labels)": routed_scores(
            te, make_router("knn", **knn_opts).fit(train).predict(te.prompts).argmax(1)
        )
        .round(4)
        .tolist()
    }
    for pooling in poolings:
        name = "population" if pooling == "attention" else f"population ({pooling})"
        pop = make_router("population", pooling=pooling, **pop_opts).fit(train)
        out[f"{name} retrained (all labels)"] = (
            te.scores[rows, pop.predict(te.prompts).argmax(1)].round(4).tolist()
        )
    return out


# ------------------------------------------------------------------ report
def _key(name: str, n: int | None) -> str:
    return name if n is None else f"{name} @ N={n}"


def _split(key: str) -> tuple[str, int | None]:
    name, _, n = key.partition(" @ N=")
    return name, int(n) if n else None


def summarise(
    results: dict[str, Any],
    test: RoutingTable,
    train: RoutingTable,
    ns: tuple[int, ...],
) -> dict[str, Any]:
    """Averages over held-out experts with intervals, the paired comparisons per N, and per expert.
    The population router compared is attention pooling when it ran, else the first pooling."""
    best = test.scores[:, int(train.scores.mean(0).argmax())]
    oracle = test.scores.max(1)
    units = results["units"]
    methods = list(next(iter(units.values()))["routed"])
    avg: dict[str, np.ndarray] = {
        m: np.mean([np.asarray(u["routed"][m]) for u in units.values()], axis=0)
        for m in methods
    }
    avg.update({k: np.asarray(v) for k, v in results["retrained"].items()})
    pops = [
        _split(m)[0]
        for m in methods
        if _split(m)[0].startswith("population")
        and _split(m)[1] is not None
        and "pseudo" not in m
    ]
    primary = "population" if "population" in pops else pops[0]

    def row(key: str, v: np.ndarray) -> dict[str, Any]:
        m, lo, hi = bootstrap_ci(v, 1000, seed=0)
        g = paired_bootstrap(v, best, oracle, 1000, seed=0)
        name, n = _split(key)
        share = (
            float(np.mean([u["share_new"][key] for u in units.values()]))
            if key in methods
            else None
        )
        return {
            "method": name,
            "N": n,
            "accuracy": m,
            "low": lo,
            "high": hi,
            "gap_closed": g["gap_closed"],
            "gap_low": g["gap_closed_low"],
            "gap_high": g["gap_closed_high"],
            "share_new": share,
        }

    def diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
        return bootstrap_ci(a - b, 1000, seed=0)

    rows = [row(k, v) for k, v in avg.items()]
    comparisons = []
    for n in ns:
        pop = avg.get(_key(primary, n))
        if pop is None:
            continue
        knns = [
            _key(k, n)
            for k in ("knn, N rows (demo mean)", "knn, N rows (k=10)")
            if _key(k, n) in avg
        ]
        strongest = max(knns, key=lambda k: avg[k].mean())
        pairs = [
            (
                pop,
                avg[strongest],
                f"{primary} - {_split(strongest)[0]} (the stronger kNN)",
            )
        ]
        for ref in (f"{primary} retrained (all labels)", "knn retrained (all labels)"):
            if ref in avg:
                pairs.append((pop, avg[ref], f"{primary} - {ref}"))
        for other in methods:
            if (
                _split(other)[1] == n
                and other != _key(primary, n)
                and other.startswith("population")
            ):
                pairs.append((avg[other], pop, f"{_split(other)[0]} - {primary}"))
        for a_, b_, label in pairs:
            m, lo, hi = diff(a_, b_)
            comparisons.append(
                {"N": n, "comparison": label, "delta": m, "low": lo, "high": hi}
            )
    per_expert = []
    for new, u in units.items():
        for n in ns:
            if _key(primary, n) not in u["routed"]:
                continue
            pop = np.asarray(u["routed"][_key(primary, n)])
            kn, k10 = (
                np.asarray(u["routed"][_key("knn, N rows (demo mean)", n)]),
                np.asarray(u["routed"][_key("knn, N rows (k=10)", n)]),
            )
            m, lo, hi = diff(pop, kn if kn.mean() >= k10.mean() else k10)
            per_expert.append(
                {
                    "new": new,
                    "N": n,
                    "population": float(pop.mean()),
                    "knn_demo_mean": float(kn.mean()),
                    "knn_k10": float(k10.mean()),
                    "delta_vs_stronger_knn": m,
                    "low": lo,
                    "high": hi,
                }
            )
    return {
        "queries": len(test),
        "best_single": float(best.mean()),
        "oracle": float(oracle.mean()),
        "primary": primary,
        "rows": rows,
        "comparisons": comparisons,
        "per_expert": per_expert,
    }


def print_summary(title: str, s: dict[str, Any]) -> None:
    print(
        f"\n### {title} ({s['queries']} test queries; best single {s['best_single']:.4f}, oracle {s['oracle']:.4f})\n"
    )
    print(
        "| system | N | accuracy [95% CI] | gap closed [95% CI] | share to the new expert |"
    )
    print("|---|---|---|---|---|")
    for r in sorted(s["rows"], key=lambda r: (r["N"] or 0, r["method"])):
        share = f"{r['share_new']:.1%}" if r["share_new"] is not None else "-"
        print(
            f"| {r['method']} | {r['N'] or '-'} | {r['accuracy']:.4f} [{r['low']:.4f}, {r['high']:.4f}] | {r['gap_closed']:.1%} [{r['gap_low']:.1%}, {r['gap_high']:.1%}] | {share} |"
        )
    print("\n| N | paired difference (same queries) | delta [95% CI] |")
    print("|---|---|---|")
    for c in s["comparisons"]:
        print(
            f"| {c['N']} | {c['comparison']} | {c['delta']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] |"
        )
    if len({p["new"] for p in s["per_expert"]}) > 1:
        print(
            f"\n| new expert | N | {s['primary']} | knn (demo mean) | knn (k=10) | {s['primary']} - stronger knn [95% CI] |"
        )
        print("|---|---|---|---|---|---|")
        for p in s["per_expert"]:
            print(
                f"| {p['new']} | {p['N']} | {p['population']:.4f} | {p['knn_demo_mean']:.4f} | {p['knn_k10']:.4f} | {p['delta_vs_stronger_knn']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--part", default="llmrouter,zoo", help="comma-separated: llmrouter, zoo"
    )
    ap.add_argument(
        "--n", default="10,20,50", help="demonstrations per new expert on LLMRouter"
    )
    ap.add_argument(
        "--zoo-n",
        default="20,50",
        help="demonstrations of smol-units (units) on the zoo",
    )
    ap.add_argument(
        "--draws",
        type=int,
        default=5,
        help="draws of demonstration rows per N (seeds 100, 101, ...)",
    )
    ap.add_argument(
        "--experts",
        default="",
        help="held-out LLMRouter models, comma-separated (default: all nine)",
    )
    ap.add_argument("--poolings", default="attention,mean")
    ap.add_argument(
        "--pseudo",
        type=int,
        default=200,
        help="pseudo-labelled training queries added to the new expert's context in the '+ pseudo-labels' rows (0: leave those rows out)",
    )
    ap.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        help="population router option KEY=VALUE (e.g. -o steps=500)",
    )
    ap.add_argument("--out", default="runs/bench-population.json")
    ap.add_argument(
        "--fresh", action="store_true", help="ignore the results already in --out"
    )
    a = ap.parse_args()
    pop_opts: dict[str, Any] = {}
    for o in a.option:
        k, v = o.split("=", 1)
        try:
            pop_opts[k] = json.loads(v)
        except json.JSONDecodeError:
            pop_opts[k] = v
    draws = (
        DRAW_SEEDS[: a.draws]
        if a.draws <= len(DRAW_SEEDS)
        else tuple(range(100, 100 + a.draws))
    )
    poolings = tuple(p for p in a.poolings.split(",") if p)
    out_p = Path(a.out)
    saved: dict[str, Any] = (
        {} if a.fresh or not out_p.is_file() else json.loads(out_p.read_text())
    )
    settings = {
        "pop_opts": pop_opts,
        "draws": list(draws),
        "poolings": list(poolings),
        "pseudo": a.pseudo,
    }

    def save() -> None:
        out_p.parent.mkdir(parents=True, exist_ok=True)
        out_p.write_text(json.dumps(saved))

    parts = [p for p in a.part.split(",") if p]
    for part in parts:
        if part == "llmrouter":
            table = from_llmrouter(costs="params")
            train, test = table.split(0.2, 0)
            ns = tuple(int(x) for x in a.n.split(","))
            new_experts = [e for e in a.experts.split(",") if e] or list(table.experts)
            knn_opts: dict[str, Any] = {}
            zoo_new = None
        elif part == "zoo":
            train, test = (
                load_table(ROOT / "examples" / "routing" / "zoo-dev.jsonl"),
                load_table(ROOT / "examples" / "routing" / "zoo-mixed.jsonl"),
            )
            ns = tuple(int(x) for x in a.zoo_n.split(","))
            new_experts, knn_opts, zoo_new = ["units"], {"k": 10}, "units"
        else:
            raise SystemExit(f"--part: expected llmrouter or zoo, found {part!r}")
        res = saved.setdefault(part, {})
        if res.get("settings") != settings:
            res.clear()
            res["settings"] = settings
        res.setdefault("units", {})
        if "retrained" not in res:
            log(f"{part}: retraining with all labels")
            res["retrained"] = run_retrained(train, test, pop_opts, knn_opts, poolings)
            save()
        for new in new_experts:
            if new in res["units"]:
                log(f"{part}: {new} already done (in {out_p})")
                continue
            t0 = time.perf_counter()
            log(f"{part}: new expert {new}")
            res["units"][new] = run_unit(
                train, test, new, ns, draws, pop_opts, knn_opts, a.pseudo, poolings
            )
            save()
            log(f"{part}: {new} done in {time.perf_counter() - t0:.0f} s")
        s = summarise(res, test, train, ns)
        res["summary"] = s
        save()
        title = (
            "LLMRouter, leave one model out"
            if zoo_new is None
            else "The zoo: smol-units (units) added from the dev table"
        )
        print_summary(title, s)


if __name__ == "__main__":
    main()
