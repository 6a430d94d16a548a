"""Routers benchmark: held-out quality on LLMRouter (5 seeds, 80/20), leave-one-task-out,
RouteLLM MMLU/GSM8K APGR and CPT, and decision latency next to the raw encoder.

    .venv/bin/python bench/routers.py [--seeds 5] [--skip-quality] [--skip-routellm] [--skip-latency] [--bert]

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
    "logreg (minilm)": ("logreg", {"encoder": "minilm"}),
    "mlp (minilm)": ("mlp", {"encoder": "minilm"}),
    "mf (minilm)": ("mf", {}),
    "subject (task)": ("subject", {}),
    "subject (cluster 32)": ("subject", {"mode": "cluster", "clusters": 32}),
    "ensemble": ("ensemble", {}),
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
    per: dict[str, list[dict]] = {k: [] for k in ["best-single", *members, "ensemble"]}
    for seed in range(seeds):
        tr, te = table.split(0.2, seed)
        fitted = [make_router(key, seed=seed, **opts).fit(tr) for key, opts in members.values()]
        preds = {}
        for name, r in zip(members, fitted):
            preds[name] = r.predict(te.prompts)
        preds["best-single"] = make_router("best-single").fit(tr).predict(te.prompts)
        preds["ensemble"] = EnsembleRouter(members=fitted).fit(tr).predict(te.prompts)
        for name, p in preds.items():
            ev = evaluate(te, p, n_boot=1000, seed=seed).data
            per[name].append(ev)
            print(f"seed {seed} {name:28s} acc {ev['accuracy']:.4f} best {ev['best_single']:.4f} gap {ev['gap_closed']:+.3f} delta_low {ev['delta_low']:+.4f}", file=sys.stderr, flush=True)
    return {"rows": [_gap_row(n, evs) | {"seeds": len(evs)} for n, evs in per.items()]}


def quality(seeds: int, bert: bool) -> dict:
    table = from_llmrouter()
    routers = dict(ROUTERS)
    if bert:
        routers["bert (MiniLM fine-tuned)"] = ("bert", {})
    per: dict[str, list[dict]] = {k: [] for k in routers}
    times: dict[str, float] = {k: 0.0 for k in routers}
    for seed in range(seeds):
        tr, te = table.split(0.2, seed)
        for name, (key, opts) in routers.items():
            if key == "bert" and seed > 0:
                continue
            t0 = time.perf_counter()
            r = make_router(key, seed=seed, **opts).fit(tr)
            ev = evaluate(te, r.predict(te.prompts), n_boot=1000, seed=seed).data
            times[name] += time.perf_counter() - t0
            per[name].append(ev)
            print(f"seed {seed} {name:28s} acc {ev['accuracy']:.4f} best {ev['best_single']:.4f} gap {ev['gap_closed']:+.3f}", file=sys.stderr, flush=True)
    rows = [_gap_row(n, evs) | {"fit_predict_s": times[n] / max(1, len(evs)), "seeds": len(evs)} for n, evs in per.items() if evs]
    # Pooled paired bootstrap over all seeds' test predictions is what 'delta_low_pooled' reports.
    return {"rows": rows, "table": table.summary()}


def loto(seed: int = 0) -> list[dict]:
    table = from_llmrouter()
    out = []
    for task, tr, te in table.leave_one_task_out():
        b = make_router("best-single").fit(tr)
        e = make_router("ensemble", seed=seed).fit(tr)
        eb = evaluate(te, b.predict(te.prompts), n_boot=1000).data
        ee = evaluate(te, e.predict(te.prompts), n_boot=1000).data
        # Compare to the expert that was best on the *other* tasks (what a fixed choice would do).
        fixed = te.scores[:, int(tr.scores.mean(0).argmax())]
        from routers.metrics import bootstrap_ci, routed_scores

        diff = routed_scores(te, e.predict(te.prompts).argmax(1)) - fixed
        m, lo, hi = bootstrap_ci(diff, 1000)
        out.append({"task": task, "queries": len(te), "train_best_single": float(fixed.mean()), "ensemble": ee["accuracy"], "delta": m, "delta_low": lo, "delta_high": hi, "test_best_single": eb["best_single"], "oracle": ee["oracle"]})
        print(f"loto {task:12s} n={len(te)} fixed {fixed.mean():.4f} ens {ee['accuracy']:.4f} delta {m:+.4f} [{lo:+.4f}, {hi:+.4f}]", file=sys.stderr, flush=True)
    return out


def routellm(seeds: int) -> list[dict]:
    out = []
    for name, loader, encoders in [("gsm8k", from_routellm_gsm8k, ["minilm", "tfidf"]), ("mmlu", from_routellm_mmlu, ["tfidf"])]:
        table = loader()
        for enc in encoders:
            for key in ["knn", "logreg", "mf", "random"]:
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


def latency() -> dict:
    from routers.encoders import TfidfEncoder, minilm

    table = from_llmrouter()
    tr, _ = table.split(0.2, 0)
    enc = minilm()
    words = "Consider the following question about the history and the science of numbers and explain".split()
    def prompt(i: int) -> str:
        return " ".join(f"{words[(i + j) % len(words)]}{i}" if j % 7 == 0 else words[(i + j) % len(words)] for j in range(150))
    ntok = len(enc.model.tokenizer(prompt(0)).input_ids)
    res: dict = {"prompt_tokens": ntok}

    def timeit(fn, n: int) -> np.ndarray:
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            ts.append((time.perf_counter() - t0) * 1e3)
        return np.array(ts)

    enc.encode_uncached([prompt(-1)])  # warm-up
    raw = timeit(lambda i: enc.encode_uncached([prompt(10_000 + i)]), 60)
    res["raw_minilm_ms"] = {"p50": float(np.percentile(raw, 50)), "p99": float(np.percentile(raw, 99))}
    routers = {
        "knn (minilm)": make_router("knn", seed=0).fit(tr),
        "logreg (minilm)": make_router("logreg", encoder="minilm").fit(tr),
        "mf (minilm)": make_router("mf").fit(tr),
        "subject (cluster)": make_router("subject", mode="cluster", clusters=32).fit(tr),
        "ensemble": make_router("ensemble").fit(tr),
        "knn (tfidf)": make_router("knn", encoder="tfidf", k=10).fit(tr),
        "logreg (tfidf)": make_router("logreg", encoder="tfidf").fit(tr),
    }
    for name, r in routers.items():
        end = timeit(lambda i: r.predict([prompt(20_000 + i)]), 60)  # new prompts: no cache hits
        x = r.features([prompt(0)])
        head = timeit(lambda i: r.predict_features(x, [prompt(0)]), 200)  # the router alone, features given
        batch_prompts = [prompt(30_000 + i) for i in range(64)]
        t0 = time.perf_counter()
        r.predict(batch_prompts)
        per_q_batch = (time.perf_counter() - t0) * 1e3 / 64
        res[name] = {"p50": float(np.percentile(end, 50)), "p99": float(np.percentile(end, 99)), "router_only_p50": float(np.percentile(head, 50)), "router_only_p99": float(np.percentile(head, 99)), "batch64_per_query": per_q_batch, "batch_speedup": float(np.percentile(end, 50) / per_q_batch)}
        print(f"latency {name:18s} p50 {res[name]['p50']:.2f} ms p99 {res[name]['p99']:.2f} router-only p50 {res[name]['router_only_p50']:.3f} ms batch64 {per_q_batch:.2f} ms/q", file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--core", action="store_true", help="quality of the ensemble and its members only (all seeds), the rest skipped")
    ap.add_argument("--skip-loto", action="store_true")
    ap.add_argument("--skip-routellm", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--bert", action="store_true", help="also fine-tune the bert router (seed 0 only; slow on CPU)")
    ap.add_argument("--out", default="runs/bench-routers.json")
    a = ap.parse_args()
    out: dict = {}
    if not a.skip_latency:
        out["latency"] = latency()
    if a.core:
        out["quality_core"] = quality_core(a.seeds)
    elif not a.skip_quality:
        out["quality"] = quality(a.seeds, a.bert)
    if not a.skip_loto:
        out["loto"] = loto()
    if not a.skip_routellm:
        out["routellm"] = routellm(a.seeds)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    prev.update(out)
    Path(a.out).write_text(json.dumps(prev, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
