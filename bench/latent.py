"""Mixture of Thoughts on the real zoo: quality on three sets, and cost.

Parts, each resumable (the trained mixture, the routing tables and every
evaluation run are kept under --work; rerun the same command to continue):

- ``skill``: the five zoo experts (SmolLM2-135M-Instruct, Gemma-3-270M, the
  arith/lists/units domain experts) on ``skill:mixed``. The mixture trains on the
  skills' training split (the seed the domain experts were trained with; disjoint
  from the benchmark). Compared with every single expert, the router alone (the
  shipped kNN router of examples/zoo.yaml, trained on skill:mixed-dev) and the
  primary alone (the mixture's own router at top_k 1: its primary, no peers).
- ``general``: SmolLM2 + Gemma (different widths, depths and tokenizers) on a
  pooled multiple-choice set, ARC-Easy (half of the validation split, by a hash of
  the id) + MMLU (test), scored by log-likelihood. The mixture trains on the other
  ARC-Easy half and MMLU's dev + validation splits (disjoint from the evaluation).
  The router alone is a kNN router (collab route train, MiniLM) trained on a
  routing table of the same training questions (each expert's correctness), the
  primary alone as above. Out of distribution: SciQ, used in no training.
- ``cost``: generation tokens/s at --tokens new tokens (end of sequence masked)
  of the mixture vs its primary alone vs the selected experts run one after the
  other, on the ``general`` checkpoint (``skill``'s if that is the only one):
  latency of the mixture over the sum of the selected experts' own runs.

Every part reports the 95% bootstrap intervals, the trainable parameters' share
of the experts' and the training time (2 CPU cores, the reported config).

Usage: python bench/latent.py skill|general|cost [--work runs/latent] [--steps N]
       [--examples N] [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
# bench/evals.py and bench/routers.py would shadow the packages of the same names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for bench.common
from bench.common import log, training_progress

EXPERTS = {
    "smol": "zoo:smollm2-135m-instruct",
    "gemma": "zoo:gemma3-270m",
    "arith": "zoo:smol-arith",
    "lists": "zoo:smol-lists",
    "units": "zoo:smol-units",
}
COSTS = {"smol": 1.0, "gemma": 2.0, "arith": 1.0, "lists": 1.0, "units": 1.0}  # ~ parameters, for the routing tables


def fmt(m: float, lo: float, hi: float) -> str:
    return f"{100 * m:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def half(example_id: str) -> int:
    """0: ARC-Easy training half, 1: evaluation half (a stable hash of the id)."""
    return hashlib.sha256(example_id.encode()).digest()[0] % 2


# ------------------------------------------------------------------ training
def train(work: Path, names: list[str], data: str, args: argparse.Namespace) -> Path:
    """The mixture of ``names`` trained on ``data`` into work/mot (kept if already there)."""
    from collab.latent.train import LatentTrainConfig, train_latent

    cfg = LatentTrainConfig(
        top_k=args.top_k, stacks=args.stacks, latent_dim=args.latent_dim, steps=args.steps, batch_size=args.batch_size,
        examples=args.examples, max_prompt_tokens=args.max_prompt_tokens, max_answer_tokens=args.max_answer_tokens, encoder=args.encoder,
    )
    out = work / "mot"
    cmd = (f"collab latent train --experts {','.join(EXPERTS[n] for n in names)} --data {data} --out {out} --top-k {cfg.top_k} "
           f"--stacks {cfg.stacks} --latent-dim {cfg.latent_dim} --steps {cfg.steps} --batch-size {cfg.batch_size} --examples {cfg.examples} "
           f"--max-prompt-tokens {cfg.max_prompt_tokens} --max-answer-tokens {cfg.max_answer_tokens} --encoder {cfg.encoder}")
    if not (out / "config.json").is_file():
        log(f"train: {cmd}")
        from collab.experts import Expert

        train_latent([Expert.load(EXPERTS[n], name=n) for n in names], data, out, cfg, progress=training_progress())
    (work / "train_command.txt").write_text(cmd + "\n")
    return out


def training_summary(ckpt: Path) -> dict[str, Any]:
    m = json.loads((ckpt / "config.json").read_text())["metrics"]
    keep = ("seconds", "trainable_parameters", "expert_parameters", "trainable_share", "primary_share", "oracle_share",
            "router_oracle_agreement", "nll_per_answer", "final_loss", "gates")
    return {k: m[k] for k in keep if k in m}


def spec_for(work: Path, names: list[str], ckpt: Path, extra: dict[str, Any] | None = None) -> Path:
    """A spec with the experts, the mixture (``mot``) and its primary alone (``mot-k1``)."""
    import yaml

    from collab.io import atomic_write_text

    systems = {
        "mot": {"type": "latent", "checkpoint": str(ckpt.relative_to(work)), "experts": list(names)},
        "mot-k1": {"type": "latent", "checkpoint": str(ckpt.relative_to(work)), "experts": list(names), "top_k": 1},
        **(extra or {}),
    }
    path = work / "spec.yaml"
    atomic_write_text(path, yaml.safe_dump({"experts": {n: {"ref": EXPERTS[n]} for n in names}, "systems": systems}, sort_keys=False))
    return path


def evaluate_systems(systems: dict[str, Any], bench: Any, limit: int, runs: Path) -> dict[str, Any]:
    from evals.runner import evaluate

    out = {}
    for name, system in systems.items():
        log(f"evaluate {name} on {getattr(bench, 'name', bench)} (first {limit})")
        res = evaluate(system, bench, limit=limit, out_dir=runs / name, progress=False)
        entry: dict[str, Any] = {"score": res.score, "ci": [res.ci_low, res.ci_high], "text": fmt(res.score, res.ci_low, res.ci_high),
                                 "n": res.n, "seconds": round(res.seconds, 1)}
        if res.groups:
            entry["groups"] = {g: round(v.get("score", v.get("acc", 0.0)), 4) if isinstance(v, dict) else v for g, v in res.groups.items()}
        primaries = [r["trace"].get("primary") for r in res.records if isinstance(r.get("trace"), dict) and r["trace"].get("type") == "latent"]
        if primaries:
            entry["primary_share"] = {p: round(primaries.count(p) / len(primaries), 4) for p in sorted(set(primaries))}
        out[name] = entry
        log(f"  {name}: {entry['text']}")
    return out


# ------------------------------------------------------------ skill:mixed
def part_skill(args: argparse.Namespace) -> dict[str, Any]:
    from collab.spec import load_spec

    names = list(EXPERTS)
    work = Path(args.work) / "skill"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = train(work, names, "skill:mixed", args)
    router = ROOT / "examples" / "artefacts" / "zoo-router"
    spec = load_spec(spec_for(work, names, ckpt, {"auto": {"type": "route", "router": str(router), "experts": list(names)}}))
    # the mixture and its references first: the single experts' figures are also in the zoo's section
    systems = {"mot": spec.system("mot"), "mot-k1 (primary alone)": spec.system("mot-k1"), "auto (router alone)": spec.system("auto")} | {n: spec.system(n) for n in names}
    return {
        "training": training_summary(ckpt),
        "train_command": (work / "train_command.txt").read_text().strip(),
        "results": evaluate_systems(systems, "skill:mixed", args.limit, work / "runs"),
        "eval_command": f"collab eval {work / 'spec.yaml'} --system mot --bench skill:mixed --limit {args.limit}",
    }


# ------------------------------------------------------------- ARC + MMLU
def general_benchmarks() -> tuple[Any, Any]:
    """(the pooled evaluation set, its training examples as (benchmark, example) pairs)."""
    from evals.benchmarks import get_benchmark
    from evals.benchmarks.base import Example, MultipleChoiceBenchmark
    from evals.benchmarks.multiple_choice import (
        MMLUBenchmark,
        lettered,
        mmlu_subjects,
        read_arrow,
    )

    arc, mmlu = get_benchmark("arc_easy"), get_benchmark("mmlu")

    class Pooled(MultipleChoiceBenchmark):
        """ARC-Easy's evaluation half and MMLU (test), interleaved; each example keeps its own prompt."""

        name = "arc_easy-half+mmlu"
        description = "ARC-Easy (validation, the evaluation half) + MMLU (test), interleaved"

        def load_examples(self) -> list[Example]:
            a = [e for e in arc.examples() if half(e.id) == 1]
            b = mmlu.examples()
            out = []
            for i in range(max(len(a), len(b))):
                for src, xs in (("arc_easy", a), ("mmlu", b)):
                    if i < len(xs):
                        e = xs[i]
                        meta = {**e.meta, "source": src, "group": src, "subject": e.meta.get("group")}
                        out.append(Example(id=f"{src}/{e.id}", question=e.question, gold=e.gold, choices=e.choices, meta=meta))
            return out

        def context(self, example: Example) -> str:
            if example.meta["source"] == "arc_easy":
                return arc.context(example)
            return mmlu.context(Example(id=example.id, question=example.question, gold=example.gold, choices=example.choices, meta={**example.meta, "group": example.meta["subject"]}))

        def continuations(self, example: Example) -> list[str]:
            return (arc if example.meta["source"] == "arc_easy" else mmlu).continuations(example)

    train: list[tuple[Any, Any]] = [(arc, e) for e in arc.examples() if half(e.id) == 0]
    for s in mmlu_subjects():
        for split in ("dev", "validation"):
            for i, r in enumerate(read_arrow(f"hails/mmlu_no_train/{s}/{split}")):
                train.append((MMLUBenchmark(s), Example(id=f"{s}-{split}-{i}", question=lettered(r["question"], r["choices"]), gold=int(r["answer"]),
                                                        choices=list(r["choices"]), meta={"stem": r["question"], "group": s})))
    return Pooled(), train


def write_general_data(work: Path, train: list[tuple[Any, Any]], n: int) -> tuple[Path, list[tuple[Any, Any]]]:
    """The first ``n`` training questions (ARC and MMLU alternating) as raw context/continuation JSONL."""
    from collab.io import atomic_write_text

    arc = [t for t in train if t[0].name == "arc_easy"]
    mm = [t for t in train if t[0].name != "arc_easy"]
    import random

    random.Random(0).shuffle(mm)
    picked = [x for pair in zip(arc, mm) for x in pair][:n]
    path = work / "train.jsonl"
    if not path.is_file():
        rows = [{"context": b.context(e), "continuation": b.continuations(e)[int(e.gold)]} for b, e in picked]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path, picked


def routing_table(work: Path, picked: list[tuple[Any, Any]], experts: dict[str, Any]) -> Path:
    """Each expert's correctness on each training question, as a routing table (JSONL)."""
    from collab.io import atomic_write_text

    path = work / "routing-train.jsonl"
    if path.is_file():
        return path
    rows = []
    for b, e in picked:
        pairs = b.pairs(e)
        scores = {}
        for n, ex in experts.items():
            lls = [ll for ll, _ in ex.loglikelihood_batch(pairs)]
            scores[n] = float(max(range(len(lls)), key=lambda i: lls[i]) == int(e.gold))
        rows.append({"id": f"{b.name}/{e.id}", "task": b.name.split(":")[0], "prompt": b.context(e), "scores": scores, "costs": {n: COSTS[n] for n in experts}})
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


class RoutedScorer:
    """The router alone on multiple choice: route the context, score with the chosen expert."""

    def __init__(self, name: str, routed: Any, experts: dict[str, Any]) -> None:
        self.name, self.routed, self.experts = name, routed, experts

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        from collab.system import GenerationRequest

        contexts = list(dict.fromkeys(c for c, _ in pairs))
        decisions = self.routed.route([GenerationRequest(prompt=c) for c in contexts])
        chosen = {c: self.routed.expert_names[d.ranking[0]] for c, (d, _) in zip(contexts, decisions)}
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for name in set(chosen.values()):
            idx = [i for i, (c, _) in enumerate(pairs) if chosen[c] == name]
            for i, r in zip(idx, self.experts[name].loglikelihood_batch([pairs[i] for i in idx])):
                out[i] = r
        return out

    def generate(self, request: Any) -> Any:
        return self.routed.generate(request)

    def stream(self, request: Any) -> Any:
        return self.routed.stream(request)


def part_general(args: argparse.Namespace) -> dict[str, Any]:
    from collab.spec import load_spec
    from routers.api import train_router

    names = ["smol", "gemma"]
    work = Path(args.work) / "general"
    work.mkdir(parents=True, exist_ok=True)
    pooled, train_pool = general_benchmarks()
    data, picked = write_general_data(work, train_pool, args.examples)
    ckpt = train(work, names, str(data), args)
    spec = load_spec(spec_for(work, names, ckpt))
    experts = {n: spec.system(n) for n in names}
    router_dir = work / "knn-router"
    if not (router_dir / "config.json").is_file():
        table = routing_table(work, picked, experts)
        encoder = "minilm" if args.encoder == "minilm" else "tfidf"
        log(f"train the router alone: collab route train --data {table} --router knn -o k=10 -o encoder={encoder} --out {router_dir}")
        train_router([str(table)], "knn", router_dir, options={"k": 10, "encoder": encoder})
    routed = load_spec(spec_for(work, names, ckpt, {"knn": {"type": "route", "router": "knn-router", "experts": list(names)}})).system("knn")
    systems = experts | {"knn (router alone)": RoutedScorer("knn", routed, experts), "mot-k1 (primary alone)": spec.system("mot-k1"), "mot": spec.system("mot")}
    from evals.benchmarks import get_benchmark

    return {
        "training": training_summary(ckpt),
        "train_command": (work / "train_command.txt").read_text().strip(),
        "training_data": {"examples": len(picked), "arc_easy_train_half": sum(1 for b, _ in picked if b.name == "arc_easy")},
        "results": evaluate_systems(systems, pooled, args.limit, work / "runs"),
        "held_out_sciq": evaluate_systems(systems, get_benchmark("sciq"), args.limit, work / "runs-sciq"),
        "eval_command": f"collab eval {work / 'spec.yaml'} --system mot --bench sciq --limit {args.limit}",
    }


# ------------------------------------------------------------------- cost
class _NoEos:
    """A harness device, as ``ignore_eos`` in serving benchmarks: every arm writes exactly --tokens tokens."""

    def __init__(self, eos: list[int]) -> None:
        self.eos = eos

    def __call__(self, logits: Any, loop: Any) -> Any:
        masked = logits.clone()
        masked[:, self.eos] = -float("inf")
        return masked.argmax(dim=-1)


def part_cost(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from collab import decode
    from collab.spec import load_spec
    from collab.system import GenerationRequest

    for part in ("general", "skill"):
        work = Path(args.work) / part
        if (work / "spec.yaml").is_file():
            break
    else:
        raise SystemExit(f"run `python bench/latent.py general` (or skill) first: the cost part reuses its checkpoint under {args.work}")
    mix = load_spec(work / "spec.yaml").system("mot")
    prompts = ["Write a long story about a lighthouse keeper who finds a message in a bottle.",
               "Explain in detail how a bicycle works, part by part.",
               "What is 37 * 8? Then describe, step by step, how you would check the result."]
    # raw prompts: no chat turn marker can stop an arm early, so every arm writes --tokens tokens
    reqs = [GenerationRequest(prompt=p + "\n", max_tokens=args.tokens) for p in prompts]

    def mixture(req: GenerationRequest) -> Any:
        with torch.inference_mode():
            routings = mix.route([req.text_for_routing()])
            driver = mix._driver(routings, [req])
        return decode.generate(driver, req, _NoEos(list(mix.experts[routings[0].primary].eos_token_ids)), trace=mix._tracer(routings, [req]))

    def alone(m: int, req: GenerationRequest) -> Any:
        e = mix.experts[m]
        return decode.generate(e, req, _NoEos(list(e.eos_token_ids)))

    warm = GenerationRequest(prompt="Hello\n", max_tokens=2)  # loads the query encoder, warms every arm
    mixture(warm)
    for m in range(len(mix.experts)):
        alone(m, warm)
    rows = []
    for rnd in range(args.rounds):
        for req in reqs:
            active = mix.route([req.text_for_routing()])[0].active
            t0 = time.perf_counter()
            c = mixture(req)
            t_mix = time.perf_counter() - t0
            separate, written = [], []
            for m in active:
                t0 = time.perf_counter()
                written.append(alone(m, req).usage.completion_tokens)
                separate.append(time.perf_counter() - t0)
            rows.append({"active": [mix.experts[m].name for m in active], "tokens": c.usage.completion_tokens, "tokens_alone": written,
                         "mixture_s": t_mix, "primary_alone_s": separate[0], "selected_separately_s": sum(separate)})
        log(f"cost round {rnd + 1}/{args.rounds}")
    tok = sum(r["tokens"] for r in rows)
    if any(r["tokens"] != args.tokens or any(n != args.tokens for n in r["tokens_alone"]) for r in rows):
        log("warning: an arm wrote fewer tokens than --tokens (a stop); tokens/s below use the mixture's count")
    t_mix, t_primary, t_sep = (sum(r[k] for r in rows) for k in ("mixture_s", "primary_alone_s", "selected_separately_s"))
    return {
        "checkpoint": str(work / "mot"),
        "training": training_summary(work / "mot"),
        "tokens_per_s": {"mixture": round(tok / t_mix, 3), "primary alone": round(tok / t_primary, 3), "selected experts separately": round(tok / t_sep, 3)},
        "mixture_over_primary_latency": round(t_mix / t_primary, 3),
        "mixture_over_selected_separately_latency": round(t_mix / t_sep, 3),
        "meets_1_25x_of_selected_separately": t_mix <= 1.25 * t_sep,
        # robust to a stalled run on a shared machine: the median over prompts of the per-prompt ratios
        "median_per_prompt_mixture_over_primary": round(statistics.median(r["mixture_s"] / r["primary_alone_s"] for r in rows), 3),
        "median_per_prompt_mixture_over_selected_separately": round(statistics.median(r["mixture_s"] / r["selected_separately_s"] for r in rows), 3),
        "per_prompt": [{**r, **{k: round(v, 3) for k, v in r.items() if k.endswith("_s")}} for r in rows],
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["skill", "general", "cost"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "latent"))
    ap.add_argument("--steps", type=int, default=60, help="joint training steps")
    ap.add_argument("--examples", type=int, default=240, help="training conversations / questions")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--stacks", type=int, default=4)
    ap.add_argument("--latent-dim", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=96)
    ap.add_argument("--max-answer-tokens", type=int, default=16)
    ap.add_argument("--encoder", default="minilm", choices=["minilm", "ngram"])
    ap.add_argument("--limit", type=int, default=100, help="first N questions of each evaluation set")
    ap.add_argument("--tokens", type=int, default=64, help="cost: new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=2, help="cost: rounds over the prompts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    result = {"skill": part_skill, "general": part_general, "cost": part_cost}[args.part](args)
    result["part"] = args.part
    result["wall_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
