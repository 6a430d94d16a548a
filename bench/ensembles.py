"""Ensembles on the real zoo: each mode against its best single member and the routed system, with cost.

Two parts, each through collab's evaluation runner (resumable: the runs are kept
under --work/runs/<bench>/<system>; rerun the same command after an interruption):

- ``skills``: skill:mixed (the first --limit questions). The ensembles of
  examples/ensembles.yaml over the three domain experts (vote, vote-table,
  best-judge, best-self, mix, contrast, proxy), each of their members alone, and
  ``auto``, the routed system of examples/zoo.yaml. Besides the score: the oracle
  (a question counts if any of the three domain experts answers it), the upper
  bound an answer-level ensemble of them could reach.
- ``mc``: arc_easy and mmlu (the first --mc-limit questions each) with SmolLM2 and
  Gemma-3-270M, which do not share a tokenizer, so only answer-level ensembles:
  scored by log-likelihood (the ensemble's is the mean of the two members'), and by
  generation (each model answers a letter; best_of with judge self, and vote, which
  with two members is the tie-breaker's answer unless both agree).

Every system gets exact match (or acc) with its 95% bootstrap interval and its
cost in model tokens per question (an ensemble's trace.cost: every member's prompt
and answer, plus what a judge reads; a single expert's own tokens; a router's
routed expert's tokens, its encoder not counted). Each ensemble is compared with
its best single member on the same questions (paired bootstrap of the
difference); the report says in words where it loses.

Usage: python bench/ensembles.py [skills|mc|all] [--limit 100] [--mc-limit 100] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
# bench/evals.py and bench/routers.py would shadow the packages of the same names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for bench.common
from bench.common import log, paired

SPEC = ROOT / "examples" / "ensembles.yaml"
ROUTED = ROOT / "examples" / "zoo.yaml"
SKILL_ENSEMBLES = ["vote", "vote-table", "best-judge", "best-self", "mix", "contrast", "proxy"]
MC_BENCHES = ["arc_easy", "mmlu"]


def fmt(m: float, lo: float, hi: float) -> str:
    return f"{100 * m:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def members_of(config: dict[str, Any]) -> list[str]:
    """The spec names an ensemble's config uses as members (contrast: base, expert, anti)."""
    if config.get("mode") == "contrast":
        return [config[k] for k in ("base", "expert", "anti") if k in config]
    return list(config["experts"])


def run(system: Any, name: str, bench: str, limit: int, work: Path, mode: str = "auto", max_tokens: int | None = None) -> dict[str, Any]:
    """One evaluation (resumed from work/runs/<bench>/<name>/<mode>): score, interval, cost and per-id scores."""
    from evals.runner import evaluate

    out = work / "runs" / bench.replace(":", "-") / name / mode
    t0 = time.time()
    res = evaluate(system, bench, limit=limit, out_dir=out, mode=mode, max_tokens=max_tokens, progress=False)
    n = max(1, res.n)
    cost = res.cost["tokens"] if res.cost else res.tokens["total"]
    entry: dict[str, Any] = {
        "score": round(res.score, 4),
        "ci": [round(res.ci_low, 4), round(res.ci_high, 4)],
        "text": fmt(res.score, res.ci_low, res.ci_high),
        "n": res.n,
        "mode": res.mode,
        "cost_tokens_per_question": round(cost / n, 1),
        "seconds": round(res.seconds, 1),
        "by_id": {r["id"]: float(r["score"]) for r in res.records},
    }
    if res.groups:
        entry["groups"] = {g: round(v["score"], 4) for g, v in res.groups.items()}
    if res.cost:
        entry["cost_ratio"] = res.cost["ratio"]
    log(f"  {bench} · {name} ({res.mode}): {entry['text']}, {entry['cost_tokens_per_question']} model tokens/question, {time.time() - t0:.0f} s")
    return entry


def verdict(name: str, entry: dict[str, Any], ref_name: str, ref: dict[str, Any]) -> str:
    """One plain sentence: wins, loses, or cannot be told apart from ``ref``, and at what cost."""
    d = paired(entry["by_id"], ref["by_id"])
    entry.setdefault("vs", {})[ref_name] = d
    times = entry["cost_tokens_per_question"] / max(1e-9, ref["cost_tokens_per_question"])
    diff = f"{100 * d['diff']:+.1f} points [{100 * d['ci'][0]:+.0f}, {100 * d['ci'][1]:+.0f}]"
    if d["ci"][1] < 0:
        head = f"{name} LOSES to {ref_name}: {diff}"
    elif d["ci"][0] > 0:
        head = f"{name} beats {ref_name}: {diff}"
    elif d["diff"] == 0 and d["ci"] == [0.0, 0.0]:
        head = f"{name} answers exactly as many questions right as {ref_name}"
    elif d["diff"] < 0:
        head = f"{name} is below {ref_name} ({diff}), within noise on {d['n']} questions"
    elif d["diff"] > 0:
        head = f"{name} is above {ref_name} ({diff}), within noise on {d['n']} questions"
    else:
        head = f"{name} is level with {ref_name} ({diff}: as many right, not the same questions) on {d['n']} questions"
    cost = f"at {times:.1f}x its model tokens"
    if times > 1.05 and not d["ci"][0] > 0:
        cost += ": it costs more for no measured gain"
    return f"{head}, {cost}"


def part_skills(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from collab.spec import load_spec

    spec = load_spec(SPEC)
    bench = "skill:mixed"
    names = [n for n in SKILL_ENSEMBLES if n in args.systems] if args.systems else SKILL_ENSEMBLES
    singles = sorted({m for n in names for m in members_of(spec.systems[n])}, key=spec.names().index)
    results: dict[str, Any] = {}
    log(f"{bench}: singles {', '.join(singles)}; ensembles {', '.join(names)}; first {args.limit}")
    for s in singles:
        results[s] = run(spec.system(s), s, bench, args.limit, work)
    if not args.no_routed:
        results["auto"] = run(load_spec(ROUTED).system("auto"), "auto", bench, args.limit, work)
    for n in names:
        results[n] = run(spec.system(n), n, bench, args.limit, work)
    domain = [s for s in ("arith", "lists", "units") if s in results]
    oracle = None
    if domain:
        ids = results[domain[0]]["by_id"]
        any_right = [max(results[s]["by_id"][i] for s in domain) for i in ids]
        oracle = round(sum(any_right) / len(any_right), 4)
    lines = []
    for n in names:
        members = members_of(spec.systems[n])
        best = max(members, key=lambda m: results[m]["score"])
        lines.append(verdict(n, results[n], f"its best member ({best})", results[best]))
        if "auto" in results:
            lines.append(verdict(n, results[n], "the routed system (auto)", results["auto"]))
    return {"bench": bench, "limit": args.limit, "results": results, "oracle_any_domain_expert": oracle, "verdicts": lines}


def part_mc(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from collab.errors import CollabError
    from collab.spec import load_spec

    spec = load_spec(SPEC)
    out: dict[str, Any] = {"limit": args.mc_limit, "benches": {}}
    for bench in MC_BENCHES:
        try:
            from evals.benchmarks import get_benchmark

            get_benchmark(bench).examples(1)
        except CollabError as e:
            out["benches"][bench] = {"skipped": str(e)}
            log(f"{bench}: skipped ({e})")
            continue
        res: dict[str, Any] = {}
        log(f"{bench}: first {args.mc_limit}, by log-likelihood then by generation")
        for n in ("smol", "gemma", "smol-gemma"):
            res[f"{n} (loglikelihood)"] = run(spec.system(n), n, bench, args.mc_limit, work, mode="loglikelihood")
        # the runner counts tokens with a system's tokenizer, and an ensemble of two has none:
        # its log-likelihood is its members' two passes over every (context, choice) pair
        both = res["smol-gemma (loglikelihood)"]
        both["cost_tokens_per_question"] = round(sum(res[f"{n} (loglikelihood)"]["cost_tokens_per_question"] for n in ("smol", "gemma")), 1)
        both["cost_note"] = "smol's and gemma's log-likelihood tokens added"
        for n in ("smol", "gemma", "smol-gemma", "smol-gemma-vote"):
            res[f"{n} (generate)"] = run(spec.system(n), n, bench, args.mc_limit, work, mode="generate", max_tokens=8)
        lines = []
        for kind in ("loglikelihood", "generate"):
            singles = {k: v for k, v in res.items() if k.endswith(f"({kind})") and k.split()[0] in ("smol", "gemma")}
            best = max(singles, key=lambda k: singles[k]["score"])
            for k, v in res.items():
                if k.endswith(f"({kind})") and k not in singles:
                    lines.append(verdict(k, v, f"the better single model ({best.split()[0]})", singles[best]))
        out["benches"][bench] = {"results": res, "verdicts": lines}
    return out


def strip(obj: Any) -> Any:
    """The report without the per-question scores (kept in the run directories)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k != "by_id"}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", default="all", choices=["skills", "mc", "all"])
    ap.add_argument("--limit", type=int, default=100, help="skill:mixed: the first N questions")
    ap.add_argument("--mc-limit", type=int, default=100, help="arc_easy and mmlu: the first N questions each")
    ap.add_argument("--systems", type=lambda s: [x for x in s.split(",") if x], default=None, help="skills: only these ensembles (comma-separated)")
    ap.add_argument("--no-routed", action="store_true", help="skills: skip the routed system")
    ap.add_argument("--work", default=str(ROOT / "runs" / "ensembles"))
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args()
    work = Path(args.work)
    t0 = time.time()
    report: dict[str, Any] = {"threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None}
    if args.part in ("skills", "all"):
        report["skills"] = part_skills(args, work)
    if args.part in ("mc", "all"):
        report["mc"] = part_mc(args, work)
    report["wall_seconds"] = round(time.time() - t0, 1)
    report = strip(report)
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    print("\nWhere an ensemble stands:")
    for part in ("skills",):
        for line in report.get(part, {}).get("verdicts", []):
            print(f"  {line}")
    for bench, info in report.get("mc", {}).get("benches", {}).items():
        for line in info.get("verdicts", [f"skipped: {info.get('skipped')}"]):
            print(f"  {bench}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
