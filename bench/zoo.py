"""The zoo's strength matrix: every zoo expert x every skill and general benchmark.

Runs collab's evaluation (the same runner as `collab eval`) for the base models
and the domain experts on the mixed-domain benchmark (its per-skill parts are
the skill benchmarks' first 100 questions), a GSM8K subset and multiple-choice
subsets, with bootstrap 95% intervals; writes the mixed runs as the canonical
routing table (`examples/routing/zoo-mixed.jsonl`) and the dev runs as router
training data (`examples/routing/zoo-dev.jsonl`); and checks the issue's targets:
each domain expert beats every other expert on its skill by >= 20 points, and
the per-query oracle is >= 15 points above the best single expert on the mix.

Usage: python bench/zoo.py [--runs runs/zoo] [--mc-limit 50] [--gsm8k-limit 20] [--markdown out.md]
Runs resume: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
# bench/evals.py and bench/routers.py would shadow the packages of the same names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
SYSTEMS = ["smol", "gemma", "arith", "lists", "units"]
SKILLS = ["arith", "lists", "units"]


def ci(values: list[float]) -> tuple[float, float, float]:
    from collab.stats import bootstrap_ci

    return bootstrap_ci(values, 1000)


def fmt(m: float, lo: float, hi: float) -> str:
    return f"{100 * m:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "zoo"))
    ap.add_argument("--mc-limit", type=int, default=50)
    ap.add_argument("--gsm8k-limit", type=int, default=20)
    ap.add_argument("--general", default="gsm8k,arc_easy,arc_challenge,mmlu,hellaswag", help="comma-separated; '' to skip")
    ap.add_argument("--mixed-limit", type=int, default=300, help="questions of skill:mixed (interleaved skills)")
    ap.add_argument("--dev-limit", type=int, default=150, help="dev questions (interleaved skills) for the router's training table")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated experts of examples/zoo-experts.yaml")
    args = ap.parse_args()
    SYSTEMS[:] = args.systems.split(",")

    from collab.spec import load_spec
    from evals.routing import collect_routing_table
    from evals.runner import evaluate

    spec = load_spec(ROOT / "examples" / "zoo-experts.yaml")
    runs = Path(args.runs)
    summary = collect_routing_table(spec.system, SYSTEMS, ["skill:mixed"], ROOT / "examples" / "routing" / "zoo-mixed.jsonl", runs_dir=runs / "mixed", limit=args.mixed_limit)
    collect_routing_table(spec.system, SYSTEMS, ["skill:mixed-dev"], ROOT / "examples" / "routing" / "zoo-dev.jsonl", runs_dir=runs / "dev", limit=args.dev_limit)
    rows = [json.loads(line) for line in (ROOT / "examples" / "routing" / "zoo-mixed.jsonl").read_text().splitlines()]

    # per-skill scores from the mixed runs (their skill parts are the skill benchmarks' first 100)
    from evals.runner import read_results

    per_skill: dict[str, dict[str, list[float]]] = {s: {k: [] for k in SKILLS} for s in SYSTEMS}
    mixed_scores: dict[str, list[float]] = {}
    for s in SYSTEMS:
        recs = read_results(runs / "mixed" / "skill-mixed" / s / "results.jsonl")[: args.mixed_limit]
        mixed_scores[s] = [r["score"] for r in recs]
        for r in recs:
            per_skill[s][r["detail"]["skill"]].append(r["score"])
    oracle = [max(r["scores"].values()) for r in rows]

    # a learned router over the five experts, trained on the dev table, scored on the mix
    from routers.api import train_router

    router_dir = ROOT / "examples" / "artefacts" / "zoo-router"
    train_router([str(ROOT / "examples" / "routing" / "zoo-dev.jsonl")], "knn", router_dir, options={"k": 10}, overwrite=True)
    routed = evaluate(load_spec(ROOT / "examples" / "zoo.yaml").system("auto"), "skill:mixed", limit=args.mixed_limit, out_dir=runs / "mixed-routed" / "auto")
    routed_skill: dict[str, list[float]] = {k: [] for k in SKILLS}
    for r in routed.records:
        routed_skill[r["detail"]["skill"]].append(r["score"])
    print(f"routed on skill:mixed: {fmt(routed.score, routed.ci_low, routed.ci_high)}", flush=True)

    general: dict[str, dict[str, tuple[float, float, float]]] = {}
    for bench in [b for b in args.general.split(",") if b]:
        limit = args.gsm8k_limit if bench == "gsm8k" else args.mc_limit
        for s in SYSTEMS:
            res = evaluate(spec.system(s), bench, limit=limit, out_dir=runs / bench / s)
            general.setdefault(bench, {})[s] = (res.score, res.ci_low, res.ci_high)

    lines = ["| expert | " + " | ".join(f"skill:{k} ({args.mixed_limit // len(SKILLS)})" for k in SKILLS) + f" | skill:mixed ({args.mixed_limit}) | "
             + " | ".join(f"{b} ({args.gsm8k_limit if b == 'gsm8k' else args.mc_limit})" for b in general) + " |"]
    lines.append("|" + "---|" * (2 + len(SKILLS) + len(general)))
    for s in SYSTEMS:
        cells = [fmt(*ci(per_skill[s][k])) for k in SKILLS] + [fmt(*ci(mixed_scores[s]))]
        cells += [fmt(*general[b][s]) for b in general]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("| per-query oracle | " + " | ".join("" for _ in SKILLS) + f" | {fmt(*ci(oracle))} | " + " | ".join("" for _ in general) + " |")
    table = "\n".join(lines)
    print(table)

    best_single = max(SYSTEMS, key=lambda s: sum(mixed_scores[s]))
    best_mean = sum(mixed_scores[best_single]) / len(mixed_scores[best_single])
    oracle_mean = sum(oracle) / len(oracle)
    checks = []
    for k, expert in zip(SKILLS, ["arith", "lists", "units"]):
        if expert not in SYSTEMS:
            continue
        own = sum(per_skill[expert][k]) / len(per_skill[expert][k])
        others = max(sum(per_skill[s][k]) / len(per_skill[s][k]) for s in SYSTEMS if s != expert)
        checks.append(f"{expert} on skill:{k}: {100 * own:.1f} vs best other {100 * others:.1f} (margin {100 * (own - others):+.1f} points; target >= +20)")
    checks.append(f"mixed: per-query oracle {100 * oracle_mean:.1f} vs best single ({best_single}) {100 * best_mean:.1f}: {100 * (oracle_mean - best_mean):+.1f} points (target >= +15)")
    checks.append(
        f"mixed: routed system (knn, k=10, trained on skill:mixed-dev) {fmt(routed.score, routed.ci_low, routed.ci_high)} "
        f"vs best single ({best_single}) {100 * best_mean:.1f}"
    )
    lines.append("| routed (knn over the five) | " + " | ".join(fmt(*ci(routed_skill[k])) for k in SKILLS) + f" | {fmt(routed.score, routed.ci_low, routed.ci_high)} | " + " | ".join("" for _ in general) + " |")
    table = "\n".join(lines)
    print("\n".join(checks))
    print(f"routing tables: examples/routing/zoo-mixed.jsonl ({summary['rows']} rows), examples/routing/zoo-dev.jsonl")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
