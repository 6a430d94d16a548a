"""FusionFactory's thought and model levels on the zoo (docs/fusion.md; figures go to docs/benchmarks.md).

Data: ``examples/routing/zoo-dev-responses.jsonl``, the routing table of the zoo's five
experts (smol, gemma, arith, lists, units) on the 300 dev questions of ``skill:mixed-dev``
with every expert's response and the gold answer (``table`` collects it with
``collab eval ... --routing-table OUT --responses`` when it is missing). Test: the first
--limit questions of ``skill:mixed`` (never in the dev table), greedy, exact answer.

1. ``thought``: a thought bank built from the dev table with --summariser (collab fuse
   thought build), then the target (--target, SmolLM2 by default) scored
   - zero-shot;
   - with the k = 3 retrieved thought templates (``type: thought``);
   - with retrieved few-shot examples (question + gold answer, same retrieval) at the
     same prompt length: the number of shots whose mean prompt length (target tokens,
     over the test questions) is nearest the thought prompts'; and with 3 shots.
2. ``distill``: ``collab fuse distill`` of the target on the dev table (gold + up to
   --k correct responses per query, by score then length) and the gold-only baseline of
   the same size, same steps; both scored, with the five experts (their scores in
   ``examples/routing/zoo-mixed.jsonl``, the same questions), the routed system
   (``examples/artefacts/zoo-router`` choosing per question, scored from that table) and the
   linear merge of the three domain experts (re-merged and scored here); the searched
   merge's figure from docs/benchmarks.md (0.347 on these 150 questions) is cited.

Every comparison is paired over the same questions (bootstrap 95%). Work is kept under
--work (default runs/bench-fusion) and reused, so rerunning continues.

    .venv/bin/python bench/fusion.py [table|thought|distill|all] [--limit 150] [--steps 150]
        [--summariser zoo:smollm2-135m-instruct] [--target zoo:smollm2-135m-instruct] [--json OUT]
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
# bench/merging.py and bench/evals.py would shadow the packages of the same names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for bench.common
from bench.common import log as common_log
from bench.common import paired

TABLE = ROOT / "examples" / "routing" / "zoo-dev-responses.jsonl"
MIXED = ROOT / "examples" / "routing" / "zoo-mixed.jsonl"
ROUTER = ROOT / "examples" / "artefacts" / "zoo-router"
SPEC = ROOT / "examples" / "zoo.yaml"
EXPERTS = ("smol", "gemma", "arith", "lists", "units")
SEARCHED_MERGE = {"score": 0.347, "ci": [0.273, 0.420], "source": "docs/benchmarks.md, Merging / Quality (searched per layer block)"}


def log(msg: str) -> None:
    common_log(msg, err=True)


def run_eval(system: Any, name: str, limit: int, work: Path) -> dict[str, Any]:
    """``system`` on the first ``limit`` questions of skill:mixed (a resumable run)."""
    from evals import evaluate

    t = time.perf_counter()
    r = evaluate(system, "skill:mixed", limit=limit, progress=False, out_dir=str(work / "runs" / name))
    prompt_tokens = sum(rec["tokens"]["prompt"] for rec in r.records) / max(1, len(r.records))
    entry = {"system": name, "score": round(r.score, 4), "ci": [round(r.ci_low, 4), round(r.ci_high, 4)], "n": r.n,
             "prompt_tokens": round(prompt_tokens, 1), "by_id": {rec["id"]: float(rec["score"]) for rec in r.records}}
    log(f"  {name}: {r.score:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] (n={r.n}, {prompt_tokens:.0f} prompt tokens, {time.perf_counter() - t:.0f} s)")
    return entry


def table_part(args: argparse.Namespace) -> dict[str, Any]:
    from collab.spec import load_spec
    from evals.routing import collect_routing_table

    if TABLE.exists():
        log(f"table: {TABLE.relative_to(ROOT)} exists")
    else:
        log("table: collecting the five experts' responses on skill:mixed-dev")
        collect_routing_table(load_spec(SPEC).system, list(EXPERTS), ["skill:mixed-dev"], TABLE, runs_dir=Path(args.work) / "dev-runs", progress=False, responses=True)
    from routers.fusion import distill_examples, read_fusion_table

    rows = read_fusion_table(TABLE, need_gold=True)
    data = distill_examples(rows, args.k)
    return {"rows": len(rows), "mean_scores": {e: round(sum(r.scores[e] for r in rows) / len(rows), 4) for e in EXPERTS},
            "distill_examples": len(data), "solved_by_some_expert": sum(any(v > 0 for v in r.scores.values()) for r in rows)}


def thought_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import numpy as np

    from collab.experts import Expert
    from collab.spec import open_system
    from collab.system import GenerationRequest
    from evals.benchmarks import get_benchmark
    from routers.fusion import (
        ThoughtBank,
        ThoughtSystem,
        build_thought_bank,
        thought_prompt,
    )

    tag = args.summariser.replace(":", "-").replace("/", "_")
    bank_dir = work / f"bank-{tag}"
    t = time.perf_counter()
    if not bank_dir.exists():
        log(f"thought bank: summarising {TABLE.name} with {args.summariser}")
        build_thought_bank(TABLE, open_system(args.summariser), bank_dir, summariser_ref=args.summariser, batch_size=8)
    bank = ThoughtBank.load(bank_dir)
    build_s = time.perf_counter() - t
    target = Expert.load(args.target, name="target")
    bench = get_benchmark("skill:mixed")
    questions = [ex.question for ex in bench.examples()[: args.limit]]
    emb = bank.encoder.encode(questions)
    hits = [bank.retrieve(q, 16, embedding=e)[0] for q, e in zip(questions, emb)]

    def mean_tokens(k: int, mode: str) -> float:
        return float(np.mean([len(target.encode(GenerationRequest.chat(thought_prompt(q, [e for e, _ in h[:k]], mode)))) for q, h in zip(questions, hits)]))

    thought_len = mean_tokens(args.templates, "thought")
    lengths = {k: mean_tokens(k, "fewshot") for k in range(1, 17)}
    matched = min(lengths, key=lambda k: (abs(lengths[k] - thought_len), k))
    log(f"  prompt tokens: thought k={args.templates} {thought_len:.0f}; few-shot {', '.join(f'{k}: {v:.0f}' for k, v in lengths.items())}; matched k={matched}")
    t = target_tag(args.target)
    rows = {
        "zero-shot": run_eval(target, f"{t}/zero-shot", args.limit, work),
        "thought": run_eval(ThoughtSystem("thought", bank, target, k=args.templates), f"{t}/thought-{tag}-k{args.templates}", args.limit, work),
        "fewshot-matched": run_eval(ThoughtSystem("fewshot", bank, target, k=matched, mode="fewshot"), f"{t}/fewshot-k{matched}", args.limit, work),
        "fewshot-3": run_eval(ThoughtSystem("fewshot", bank, target, k=3, mode="fewshot"), f"{t}/fewshot-k3", args.limit, work),
    }
    templates = [e.template for e in bank.entries]
    return {
        "summariser": args.summariser, "target": args.target, "bank": str(bank_dir), "build_s": round(build_s, 1),
        "empty_templates": sum(not t for t in templates), "mean_template_chars": round(float(np.mean([len(t) for t in templates])), 1),
        "examples": [{"prompt": e.prompt, "template": e.template} for e in bank.entries[:3]],
        "fewshot_matched_k": matched, "thought_prompt_tokens": round(thought_len, 1), "fewshot_prompt_tokens": {k: round(v, 1) for k, v in lengths.items()},
        "rows": rows,
        "thought_vs": {name: paired(rows["thought"]["by_id"], rows[name]["by_id"]) for name in ("zero-shot", "fewshot-matched", "fewshot-3")},
    }


def target_tag(ref: str) -> str:
    """A directory name for a target model reference."""
    return ref.replace(":", "-").replace("/", "_")


def table_scores(ids: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Each expert's and the routed system's per-question scores on skill:mixed, from the shipped table."""
    from collab.system import GenerationRequest
    from routers.base import Router
    from routers.system import RoutedSystem
    from routers.table import load_table

    table = load_table(MIXED)
    by = {rid.split("/", 1)[1]: i for i, rid in enumerate(table.ids)}
    missing = [i for i in ids if i not in by]
    if missing:
        raise SystemExit(f"{MIXED}: no row for {missing[0]} (the table holds the first {len(by)} questions of skill:mixed)")
    experts = {e: {i: float(table.scores[by[i], table.experts.index(e)]) for i in ids} for e in table.experts}
    routed = RoutedSystem("routed", Router.load(ROUTER), None)
    decisions = routed.route([GenerationRequest.chat(table.prompts[by[i]]) for i in ids])
    chosen = {i: routed.expert_names[d.ranking[0]] for i, (d, _) in zip(ids, decisions)}
    return experts, {i: experts[chosen[i]][i] for i in ids}


def summary(name: str, by_id: dict[str, float]) -> dict[str, Any]:
    from collab.stats import bootstrap_ci

    ids = sorted(by_id)
    mean, lo, hi = bootstrap_ci([by_id[i] for i in ids])
    return {"system": name, "score": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "n": len(ids), "by_id": by_id}


def distill_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from collab.experts import Expert
    from merging import merge
    from merging.cold import linear_config
    from merging.distill import DistillConfig, distill

    rows: dict[str, dict[str, Any]] = {}
    records = {}
    for setting in ("perf", "gold"):
        out = work / f"distill-{target_tag(args.target)}-{setting}-k{args.k}-s{args.steps}"
        if not (out / "distill.json").exists():
            log(f"distill ({setting}): {args.steps} steps")
            cfg = DistillConfig(target=args.target, k=args.k, setting=setting, steps=args.steps, batch_size=8, learning_rate=args.lr, seed=args.seed)
            distill(TABLE, cfg, out, progress=lambda s, n, loss: log(f"  step {s}/{n} loss {loss:.3f}") if s % 25 == 0 or s == n else None)
        records[setting] = json.loads((out / "distill.json").read_text())
        name = "distilled" if setting == "perf" else "gold-only"
        rows[name] = run_eval(Expert.load(str(out), name=name), f"{target_tag(args.target)}/{name}-k{args.k}-s{args.steps}", args.limit, work)
    base_run = run_eval(Expert.load(args.target, name="target"), f"{target_tag(args.target)}/zero-shot", args.limit, work)
    merged = work / "linear-merge"
    if not (merged / "config.json").exists():
        from collab.zoo import get

        merge(linear_config([get(f"smol-{s}").path() for s in ("arith", "lists", "units")]), merged, quiet=True, overwrite=True)
    rows["linear merge"] = run_eval(Expert.load(str(merged), name="linear-merge"), "linear-merge", args.limit, work)
    ids = sorted(rows["distilled"]["by_id"])
    experts, routed = table_scores(ids)
    for e, by_id in experts.items():
        rows[f"expert {e}"] = summary(f"expert {e}", by_id)
    rows["routed (zoo-router)"] = summary("routed (zoo-router)", routed)
    rows["target zero-shot (re-run)"] = base_run
    best_expert = max(experts, key=lambda e: sum(experts[e].values()))
    vs = {name: paired(rows["distilled"]["by_id"], rows[name]["by_id"]) for name in rows if name != "distilled"}
    return {
        "target": args.target, "steps": args.steps, "k": args.k,
        "training": {s: {"examples": r["examples"], "by_source": r["by_source"], "final_loss": round(r["final_loss"], 4), "seconds": r["seconds"]} for s, r in records.items()},
        "rows": rows, "best_expert": best_expert, "distilled_vs": vs, "searched_merge": SEARCHED_MERGE,
    }


def fmt(r: dict[str, Any]) -> str:
    return f"{100 * r['score']:.1f} [{100 * r['ci'][0]:.0f}-{100 * r['ci'][1]:.0f}]"


def fmt_diff(p: dict[str, Any]) -> str:
    return f"{100 * p['diff']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", nargs="?", default="all", choices=["table", "thought", "distill", "all"])
    ap.add_argument("--limit", type=int, default=150, help="skill:mixed test questions scored")
    ap.add_argument("--summariser", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--target", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--templates", type=int, default=3, help="templates retrieved per query")
    ap.add_argument("--k", type=int, default=5, help="correct pool responses per query in the distillation set")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-fusion"))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"command": " ".join(sys.argv), "table": table_part(args)}
    if args.part in ("thought", "all"):
        out["thought"] = thought_part(args, work)
        th = out["thought"]
        print(f"\nThought level ({th['summariser']} summarises, {th['target']} answers; skill:mixed first {args.limit}):")
        print("| system | score [95% CI] | prompt tokens | thought minus it (paired) |\n|---|---|---|---|")
        for name, r in th["rows"].items():
            d = th["thought_vs"].get(name)
            print(f"| {name} | {fmt(r)} | {r['prompt_tokens']:.0f} | {fmt_diff(d) if d else ''} |")
    if args.part in ("distill", "all"):
        out["distill"] = di = distill_part(args, work)
        print(f"\nModel level (distilled {di['target']}, {di['steps']} steps; skill:mixed first {args.limit}):")
        print("| system | score [95% CI] | distilled minus it (paired) |\n|---|---|---|")
        for name, r in di["rows"].items():
            d = di["distilled_vs"].get(name)
            print(f"| {name} | {fmt(r)} | {fmt_diff(d) if d else ''} |")
        print(f"searched merge (cited): {100 * SEARCHED_MERGE['score']:.1f} [{100 * SEARCHED_MERGE['ci'][0]:.0f}-{100 * SEARCHED_MERGE['ci'][1]:.0f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
