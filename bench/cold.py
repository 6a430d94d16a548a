"""ColD Fusion on the real zoo (docs/cold.md; figures go to docs/benchmarks.md).

Base: zoo:smollm2-135m-instruct. Contributors: skill:arith, skill:lists,
skill:units (each with its own seeded training data, never shared).

1. ``fuse``: ColD Fusion for --iterations iterations of --per-iter contributors
   x --steps LoRA steps; every iteration's fused model scored on the first
   --limit questions of skill:mixed (collab's evaluation runner, bootstrap 95%
   intervals), each compared with iteration 1 on the same questions (paired
   bootstrap of the difference). Against it, on the same questions:
   - the base model;
   - the one-shot linear merge of the zoo's three experts (smol-arith,
     smol-lists, smol-units, weight 1 each; 0.280 [0.213, 0.353] on these 150
     questions in docs/benchmarks.md, Merging/Quality), re-merged and re-scored
     here so that the comparison is paired;
   - a multitask LoRA trained from the base on the union of the three skills'
     data, with the same total number of steps as the fusion (iterations x
     per-iter x steps), same batch size, rank and learning rate.
2. ``unseen`` (exploratory): ColD Fusion of two skills (--unseen-fuse, default
   arith and lists), then a --unseen-examples-example fine-tune on the third
   skill (--unseen-steps steps) from the fused model and from the base; both
   scored on that skill's first --unseen-limit test questions, paired.

Everything is kept under --work (default runs/bench-cold): the fusion runs
resume at iteration granularity, the evaluation runs where they stopped, and
trained models are reused, so rerunning the same command continues.

    .venv/bin/python bench/cold.py [fuse|unseen|all] [--iterations 3] [--per-iter 3] [--steps 30]
        [--limit 150] [--unseen-steps 25] [--unseen-limit 100] [--work DIR] [--json OUT]
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

BASE = "zoo:smollm2-135m-instruct"
SKILLS = ("arith", "lists", "units")
ZOO_EXPERTS = ("zoo:smol-arith", "zoo:smol-lists", "zoo:smol-units")


def log(msg: str) -> None:
    common_log(msg, err=True)


def score(model: Path | str, name: str, bench: str, limit: int, work: Path) -> dict[str, Any]:
    """``name``'s score on the first ``limit`` questions of ``bench`` (resumable run)."""
    from collab.experts import Expert
    from evals import evaluate

    t = time.perf_counter()
    expert = Expert.load(model, name=name)
    r = evaluate(expert, bench, limit=limit, progress=False, out_dir=str(work / "runs" / bench.replace(":", "-") / name))
    del expert
    entry = {"system": name, "bench": bench, "score": round(r.score, 4), "ci": [round(r.ci_low, 4), round(r.ci_high, 4)], "n": r.n,
             "by_id": {rec["id"]: float(rec["score"]) for rec in r.records}}
    log(f"  {name} on {bench}: {r.score:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] (n={r.n}, {time.perf_counter() - t:.0f} s)")
    return entry


def cold_config(args: argparse.Namespace, skills_: list[str], per_iter: int | None) -> Any:
    from merging.cold import ColdFusionConfig

    return ColdFusionConfig(base=BASE, contributors=[f"skill:{s}" for s in skills_], iterations=args.iterations, per_iter=per_iter,
                            steps=args.steps, seed=args.seed, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup)


def train_from(base: Path | str, examples: list[Any], steps: int, out: Path, args: argparse.Namespace, name: str) -> tuple[Path, float]:
    """A LoRA of ``steps`` steps on ``examples`` from ``base``, merged into dense weights at ``out`` (reused if there)."""
    from collab.zoo_build import DomainExpertConfig, save_merged, train_lora

    if (out / "config.json").exists():
        return out, 0.0
    cfg = DomainExpertConfig(skill=name, base=str(base), steps=steps, batch_size=args.batch_size, learning_rate=args.lr,
                             warmup_steps=args.warmup, seed=args.seed, train_examples=len(examples))
    t = time.perf_counter()
    run = train_lora(cfg, examples, base=base, progress=lambda s, n, loss: log(f"  {name}: step {s}/{n} loss {loss:.3f}") if s % 10 == 0 or s == n else None)
    save_merged(run, out, side_files_from=_model_dir(base))
    return out, time.perf_counter() - t


def _model_dir(ref: Path | str) -> Path:
    from collab.experts import dequantised_dir, resolve_ref

    res = resolve_ref(str(ref))
    return dequantised_dir(res) if res.gguf_file else res.path


def fuse_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from collab import skills
    from merging import merge
    from merging.cold import cold_fusion

    k = args.per_iter or len(SKILLS)
    t = time.perf_counter()
    log(f"ColD Fusion: {args.iterations} iterations x {k} of {len(SKILLS)} contributors x {args.steps} steps")
    tag = f"k{k}-s{args.steps}-seed{args.seed}"
    res = cold_fusion(cold_config(args, list(SKILLS), args.per_iter), work / f"cold-{tag}", quiet=True,
                      on_iteration=lambda it, path: log(f"  iteration {it} written: {path}"))
    fuse_s = time.perf_counter() - t
    rows = [score(m, f"cold-{tag}-{m.name}", "skill:mixed", args.limit, work) for m in res.models[: args.iterations]]
    for row, it in zip(rows, res.record["iterations"]):
        row["contributors"] = it["contributors"]
        row["vs_iter1"] = paired(row["by_id"], rows[0]["by_id"])
    linear_dir = work / "linear-zoo"
    if not (linear_dir / "config.json").exists():
        merge({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}} for e in ZOO_EXPERTS], "dtype": "float32"},
              linear_dir, quiet=True, overwrite=True)
    linear = score(linear_dir, "linear-zoo", "skill:mixed", args.limit, work)
    total = args.iterations * k * args.steps
    union = [ex for group in zip(*(skills.generate(s, 4000, skills.TRAIN_SEED) for s in SKILLS)) for ex in group]
    log(f"multitask LoRA: {total} steps on the union of {len(union)} examples")
    mt_name = f"multitask-{total}steps-seed{args.seed}"
    mt_dir, mt_s = train_from(BASE, union, total, work / mt_name, args, mt_name)
    multitask = score(mt_dir, mt_name, "skill:mixed", args.limit, work)
    base = score(BASE, "base", "skill:mixed", args.limit, work)
    final = rows[-1]
    return {
        "iterations": rows,
        "linear_zoo": linear,
        "multitask": {**multitask, "steps": total, "train_seconds": round(mt_s, 1)},
        "base": base,
        "final_vs": {name: paired(final["by_id"], other["by_id"]) for name, other in
                     (("iter1", rows[0]), ("linear_zoo", linear), ("multitask", multitask), ("base", base))},
        "fuse_seconds": round(fuse_s, 1),
    }


def unseen_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from collab import skills
    from merging.cold import cold_fusion

    fuse = [s for s in args.unseen_fuse.split(",") if s]
    held = [s for s in SKILLS if s not in fuse]
    if len(held) != 1:
        raise SystemExit(f"--unseen-fuse: expected two of {', '.join(SKILLS)}, found {args.unseen_fuse!r}")
    target = held[0]
    log(f"unseen: fuse {', '.join(fuse)} ({args.iterations} iterations x {args.steps} steps), then {args.unseen_examples} examples of {target}")
    tag = f"{'-'.join(fuse)}-s{args.steps}-seed{args.seed}"
    res = cold_fusion(cold_config(args, fuse, None), work / f"cold-unseen-{tag}", quiet=True)
    fused = res.models[args.iterations - 1]
    examples = skills.generate(target, args.unseen_examples, skills.TRAIN_SEED)
    ft = f"{target}-{args.unseen_examples}ex-{args.unseen_steps}steps"
    names = {"fused": f"{ft}-from-{tag}-{fused.name}", "base": f"{ft}-from-base-seed{args.seed}"}
    from_fused, _ = train_from(fused, examples, args.unseen_steps, work / names["fused"], args, names["fused"])
    from_base, _ = train_from(BASE, examples, args.unseen_steps, work / names["base"], args, names["base"])
    bench = f"skill:{target}"
    a = score(from_fused, names["fused"], bench, args.unseen_limit, work)
    b = score(from_base, names["base"], bench, args.unseen_limit, work)
    c = score(fused, f"cold-unseen-{tag}-{fused.name}", bench, args.unseen_limit, work)
    return {"skill": target, "fused": fuse, "from_fused": a, "from_base": b, "fused_alone": c, "diff": paired(a["by_id"], b["by_id"])}


def estimate(args: argparse.Namespace, parts: list[str]) -> float:
    k = args.per_iter or len(SKILLS)
    steps = questions = 0
    if "fuse" in parts:
        steps += 2 * args.iterations * k * args.steps  # the fusion, then the multitask LoRA of as many steps
        questions += (args.iterations + 3) * args.limit
    if "unseen" in parts:
        steps += args.iterations * 2 * args.steps + 2 * args.unseen_steps
        questions += 3 * args.unseen_limit
    return steps * args.sec_per_step + questions * args.sec_per_question


def fmt(e: dict[str, Any]) -> str:
    return f"{e['score']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"


def fmt_diff(d: dict[str, Any]) -> str:
    return f"{100 * d['diff']:+.1f} points [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    if "fuse" in out:
        f = out["fuse"]
        print(f"\n## ColD Fusion on skill:mixed (first {args.limit} questions), accuracy [bootstrap 95%]\n")
        print("| system | skill:mixed | vs iteration 1 (paired) | contributors |\n|---|---|---|---|")
        for i, r in enumerate(f["iterations"], 1):
            print(f"| ColD Fusion iteration {i} | {fmt(r)} | {fmt_diff(r['vs_iter1']) if i > 1 else ''} | {', '.join(r['contributors'])} |")
        print(f"| linear merge of the zoo experts (one shot) | {fmt(f['linear_zoo'])} | | |")
        print(f"| multitask LoRA, {f['multitask']['steps']} steps on the union | {fmt(f['multitask'])} | | |")
        print(f"| base (SmolLM2-135M-Instruct) | {fmt(f['base'])} | | |")
        print("\nFinal iteration minus (paired over the same questions):")
        for name, d in f["final_vs"].items():
            print(f"- {name}: {fmt_diff(d)}")
        print(f"\nFusion {f['fuse_seconds']} s; multitask LoRA {f['multitask']['train_seconds']} s (0 when reused).")
    if "unseen" in out:
        u = out["unseen"]
        print(f"\n## Unseen skill (exploratory): fuse {', '.join(u['fused'])}, then {args.unseen_examples} examples of {u['skill']}, "
              f"{args.unseen_steps} steps; skill:{u['skill']} (first {args.unseen_limit})\n")
        print("| start of the fine-tune | skill score |\n|---|---|")
        print(f"| fused model | {fmt(u['from_fused'])} |\n| base | {fmt(u['from_base'])} |\n| (fused model, no fine-tune) | {fmt(u['fused_alone'])} |")
        print(f"\nFrom fused minus from base: {fmt_diff(u['diff'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", default="all", choices=["fuse", "unseen", "all"])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--per-iter", type=int, default=None, help="contributors per iteration (default: all three)")
    ap.add_argument("--steps", type=int, default=30, help="LoRA steps per contributor per iteration")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=150, help="skill:mixed questions (150 = the 50 per skill of docs/benchmarks.md)")
    ap.add_argument("--unseen-fuse", default="arith,lists", help="the two skills fused for the unseen-skill check")
    ap.add_argument("--unseen-examples", type=int, default=100)
    ap.add_argument("--unseen-steps", type=int, default=25, help="steps of the fine-tune on the unseen skill (100 examples / 8 = 12.5 per epoch)")
    ap.add_argument("--unseen-limit", type=int, default=100, help="test questions of the unseen skill")
    ap.add_argument("--sec-per-step", type=float, default=4.0, help="for the wall-time estimate (a LoRA step of SmolLM2, 8x64 tokens, this CPU)")
    ap.add_argument("--sec-per-question", type=float, default=0.5, help="for the wall-time estimate")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-cold")
    ap.add_argument("--json", type=Path, default=None, help="also write the results (without per-question scores) here")
    args = ap.parse_args()
    parts = ["fuse", "unseen"] if args.part == "all" else [args.part]
    est = estimate(args, parts)
    log(f"estimated wall time: {est / 60:.0f} min ({args.sec_per_step} s per LoRA step, {args.sec_per_question} s per question); work {args.work}")
    t = time.perf_counter()
    out: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if "fuse" in parts:
        out["fuse"] = fuse_part(args, args.work)
    if "unseen" in parts:
        out["unseen"] = unseen_part(args, args.work)
    out["seconds"] = round(time.perf_counter() - t, 1)
    out["load_average"] = os.getloadavg()[0]
    report(out, args)
    print(f"\nWall time {out['seconds'] / 60:.1f} min (estimated {est / 60:.0f}); load average {out['load_average']:.1f}.")
    if args.json is not None:
        def strip(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if k != "by_id"}
            if isinstance(x, list):
                return [strip(v) for v in x]
            return x

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(strip(out), indent=2) + "\n")


if __name__ == "__main__":
    main()
