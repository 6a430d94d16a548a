"""Co-LLM on the real zoo: quality with one assistant, quality with the whole zoo, cost.

Three parts, each resumable (rerun the same command after an interruption; the
trained heads, tuning curves and evaluation runs are kept under --work):

- ``one``: base SmolLM2-135M-Instruct + one domain expert (default smol-arith)
  on that expert's skill. Trains a head (weak supervision, then the marginal
  likelihood with a LoRA on the base) on the skill's training split with answers
  written as "The answer is N.", tunes eta on the skill's dev split, and scores
  base, assistant and co-decoder on the first --test questions of skill:NAME
  with collab's evaluation runner; reports the curve over eta and which tokens
  get deferred (digits vs the rest).
- ``zoo``: the base + all three domain experts (a 4-way head) on skill:mixed,
  beside every single expert and the routed system of examples/zoo.yaml, at the
  same evaluation; deferral rate and per-expert token shares.
- ``cost``: tokens/s at --tokens generated tokens of the co-decoder (at the
  threshold giving <= 20% deferral on these prompts) vs the base alone in the
  same run, and vs a naive co-decoder whose assistant recomputes its whole
  prefix at every deferral (``decoding.reference.NaiveDeferralRule``).

Usage: python bench/decoding.py one|zoo|cost [--work runs/decoding] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from bench.common import log, training_progress

BASE = "zoo:smollm2-135m-instruct"
ASSISTANTS = {"arith": "zoo:smol-arith", "lists": "zoo:smol-lists", "units": "zoo:smol-units"}
TEMPLATE = "The answer is {answer}."


def fmt(m: float, lo: float, hi: float) -> str:
    return f"{100 * m:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def write_training_data(path: Path, skills_: list[str], n: int) -> Path:
    """The skills' training split (the seed the domain experts were trained with), answers as full sentences."""
    from collab import skills
    from collab.io import atomic_write_text

    if path.is_file():
        return path
    per = [skills.generate(s, -(-n // len(skills_)), skills.TRAIN_SEED) for s in skills_]
    rows = [ex for group in zip(*per) for ex in group][:n]
    atomic_write_text(path, "".join(json.dumps({"prompt": e.question, "response": TEMPLATE.format(answer=e.answer)}) + "\n" for e in rows))
    return path


def spec_for(work: Path, names: list[str], head: Path, threshold: float) -> Path:
    """A spec with the base, the assistants and the co-decoder (what `collab eval` and `collab serve` read)."""
    import yaml

    from collab.io import atomic_write_text

    data = {
        "experts": {"smol": {"ref": BASE}, **{n: {"ref": ASSISTANTS[n]} for n in names}},
        "systems": {"duo": {"type": "codecode", "base": "smol", "assistants": names, "head": str(head.relative_to(work)), "threshold": round(threshold, 6)}},
    }
    path = work / "spec.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def ensure_type() -> None:
    """Register ``type: codecode`` when the installed package does not declare its entry point yet."""
    from collab.spec import register_system_type, system_types
    from decoding.system import CoDecoderSystemType

    if "codecode" not in system_types():
        register_system_type("codecode", CoDecoderSystemType())


def train_and_tune(work: Path, names: list[str], skills_: list[str], args: argparse.Namespace) -> tuple[Path, Any]:
    from decoding.train import TrainConfig, train_colm
    from decoding.tune import tune_head

    work.mkdir(parents=True, exist_ok=True)
    data = write_training_data(work / "train.jsonl", skills_, args.train_examples)
    head = work / "head"
    cfg = TrainConfig(steps=args.steps, init_steps=args.init_steps, train_base=args.train_base, batch_size=args.batch_size,
                      examples=args.train_examples, lora_lr=args.lora_lr, lr=args.lr, init_lr=args.lr)
    cmd = (f"collab decode train --base {BASE} --assistant {','.join(ASSISTANTS[n] for n in names)} --data {data} --out {head} "
           f"--train-base {cfg.train_base} --init-steps {cfg.init_steps} --steps {cfg.steps} --batch-size {cfg.batch_size} "
           f"--examples {cfg.examples} --lr {cfg.lr} --init-lr {cfg.init_lr} --lora-lr {cfg.lora_lr}")
    if not (head / "config.json").is_file():
        log(f"train: {cmd}")
        train_colm(BASE, [ASSISTANTS[n] for n in names], str(data), head, cfg, progress=training_progress())
    tune_dir = work / "tune"
    dev = f"dev:{skills_[0] if len(skills_) == 1 else 'mixed'}"
    tune_cmd = f"collab decode tune --head {head} --data {dev} --limit {args.dev} --out {tune_dir}"
    if not (tune_dir / "curve.json").is_file():
        log(f"tune: {tune_cmd}")
        tune_head(head, dev, tune_dir, limit=args.dev, rates=[float(r) for r in args.rates.split(",")],
                  progress=lambda done, total: log(f"  tune: {done}/{total} thresholds done"))
    curve = json.loads((tune_dir / "curve.json").read_text())
    from decoding.tune import CurvePoint, choose

    best, cheapest = choose([CurvePoint(**p) for p in curve["points"]])
    picks = {"best": best.threshold, "cheapest": cheapest.threshold}
    return head, {"train_command": cmd, "tune_command": tune_cmd, "curve": curve, "picks": picks, "head_config": json.loads((head / "config.json").read_text())}


def deferral_analysis(records: list[dict[str, Any]], base_name: str) -> dict[str, Any]:
    """Which tokens the assistants wrote: digits vs everything else, and a few marked answers."""
    kinds: dict[str, list[int]] = {"digit": [0, 0], "other": [0, 0], "end of sequence": [0, 0]}
    examples = []
    for r in records:
        toks = r["trace"]["tokens"]
        for t in toks:
            special = t["text"].startswith("<|") and t["text"].endswith("|>")
            kind = "digit" if t["text"].strip().isdigit() else ("end of sequence" if special else "other")
            kinds[kind][0] += t["by"] != base_name
            kinds[kind][1] += 1
        if len(examples) < 6:
            examples.append("".join(f"[{t['text']}]" if t["by"] != base_name else t["text"] for t in toks))
    return {"deferred_share_by_kind": {k: {"deferred": d, "tokens": n, "share": round(d / n, 4) if n else None} for k, (d, n) in kinds.items()},
            "examples_assistant_in_brackets": examples}


def evaluate_systems(spec_path: Path, systems: dict[str, Any], bench: str, limit: int, runs: Path) -> dict[str, Any]:
    from evals.runner import evaluate

    out = {}
    for name, system in systems.items():
        log(f"evaluate {name} on {bench} (first {limit})")
        res = evaluate(system, bench, limit=limit, out_dir=runs / name, progress=False)
        entry: dict[str, Any] = {"score": res.score, "ci": [res.ci_low, res.ci_high], "text": fmt(res.score, res.ci_low, res.ci_high), "seconds": round(res.seconds, 1)}
        if res.groups:
            entry["groups"] = res.groups
        if res.records and "deferral_rate" in (res.records[0].get("trace") or {}):
            counts: dict[str, int] = {}
            for r in res.records:
                for k, v in r["trace"]["tokens_by_expert"].items():
                    counts[k] = counts.get(k, 0) + v
            total = sum(counts.values())
            base_name = res.records[0]["trace"]["base"]
            entry["deferral_rate"] = round(1 - counts[base_name] / total, 4)
            entry["token_share"] = {k: round(v / total, 4) for k, v in counts.items()}
            entry["analysis"] = deferral_analysis(res.records, base_name)
        out[name] = entry
        log(f"  {name}: {entry['text']}" + (f", deferral rate {entry['deferral_rate']:.1%}" if "deferral_rate" in entry else ""))
    return out


def part_one(args: argparse.Namespace) -> dict[str, Any]:
    from collab.spec import load_spec
    from decoding.system import CoLLMDecoder

    name = args.assistant
    work = Path(args.work) / f"one-{name}"
    head, info = train_and_tune(work, [name], [name], args)
    ensure_type()
    spec = load_spec(spec_for(work, [name], head, info["picks"]["best"]))
    duo = spec.system("duo")
    cheap = CoLLMDecoder(duo.base, duo.assistants, duo.head, info["picks"]["cheapest"], name="duo-cheapest")
    never = CoLLMDecoder(duo.base, duo.assistants, duo.head, 1.0, name="duo-eta1")  # the (LoRA-adapted) base alone
    systems = {"smol": spec.system("smol"), name: spec.system(name), "duo": duo, "duo-cheapest": cheap, "duo-eta1": never}
    info["results"] = evaluate_systems(spec.path, systems, f"skill:{name}", args.test, work / "runs")
    info["eval_command"] = f"collab eval {work / 'spec.yaml'} --system duo --bench skill:{name} --limit {args.test}"
    return info


def part_zoo(args: argparse.Namespace) -> dict[str, Any]:
    from collab.spec import load_spec

    names = list(ASSISTANTS)
    work = Path(args.work) / "zoo"
    head, info = train_and_tune(work, names, names, args)
    from decoding.system import CoLLMDecoder

    ensure_type()
    spec = load_spec(spec_for(work, names, head, info["picks"]["best"]))
    duo = spec.system("duo")
    systems: dict[str, Any] = {"smol": spec.system("smol"), **{n: spec.system(n) for n in names}, "duo": duo}
    if info["picks"]["cheapest"] != info["picks"]["best"]:
        systems["duo-cheapest"] = CoLLMDecoder(duo.base, duo.assistants, duo.head, info["picks"]["cheapest"], name="duo-cheapest")
    if not args.no_routed:
        systems["auto"] = load_spec(ROOT / "examples" / "zoo.yaml").system("auto")
    info["results"] = evaluate_systems(spec.path, systems, "skill:mixed", args.test, work / "runs")
    info["eval_command"] = f"collab eval {work / 'spec.yaml'} --system duo --bench skill:mixed --limit {args.test}"
    return info


class _NoEos:
    """A harness device, as ``ignore_eos`` in serving benchmarks: the end-of-sequence
    tokens are masked so every arm writes exactly --tokens tokens."""

    def __init__(self, pick: Any, eos: list[int]) -> None:
        self.pick, self.eos = pick, eos

    def __call__(self, logits: Any, loop: Any) -> Any:
        masked = logits.clone()
        masked[:, self.eos] = -float("inf")
        return self.pick(masked, loop) if self.pick is not None else masked.argmax(dim=-1)


def part_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s at --tokens new tokens: co-decoder vs base alone vs the naive co-decoder."""
    from collab import decode
    from collab.experts import Expert
    from collab.system import GenerationRequest
    from decoding.reference import NaiveDeferralRule
    from decoding.system import CoLLMDecoder
    from decoding.tune import thresholds_for_rates

    head = Path(args.work) / f"one-{args.assistant}" / "head"
    if not (head / "config.json").is_file():
        raise SystemExit(f"{head}: run `python bench/decoding.py one --assistant {args.assistant}` first (the cost part reuses its head)")
    base = Expert.load(BASE, name="smol")
    asst = Expert.load(ASSISTANTS[args.assistant], name=args.assistant)
    prompts = [
        "Write a long story about a lighthouse keeper who finds a message in a bottle.",
        "Explain in detail how a bicycle works, part by part.",
        "What is 37 * 8? Then describe, step by step, how you would check the result.",
    ]
    reqs = [GenerationRequest.chat(p, max_tokens=args.tokens) for p in prompts]
    d = CoLLMDecoder.load(head, base, [asst], 1.0)
    driver = d.base  # the base the co-decoder drives (with its LoRA merged, if trained with one)
    eos = list(driver.eos_token_ids)

    def co_decode(decoder: CoLLMDecoder, rule_type: type, req: GenerationRequest) -> Any:
        rule = rule_type(decoder, [req])
        rule.pick = _NoEos(rule.pick, eos)
        return decode.generate(driver, req, rule, trace=decoder.trace_for)

    from decoding.system import DeferralRule

    g = [t["g"] for r in reqs for t in co_decode(d, DeferralRule, r).trace["tokens"]]
    eta = thresholds_for_rates(g, [args.rate])[0]
    d.threshold = eta
    arms = {
        "base alone": lambda req: decode.generate(driver, req, _NoEos(None, eos)),
        "co-decoder": lambda req: co_decode(d, DeferralRule, req),
        "naive co-decoder": lambda req: co_decode(d, NaiveDeferralRule, req),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    tokens: dict[str, list[int]] = {k: [] for k in arms}
    rates: list[float] = []
    texts_equal = []
    for rnd in range(args.rounds):
        for req in reqs:
            order = list(arms) if rnd % 2 == 0 else list(reversed(arms))
            got = {}
            for k in order:
                t0 = time.perf_counter()
                c = arms[k](req)
                times[k].append(time.perf_counter() - t0)
                tokens[k].append(c.usage.completion_tokens)
                got[k] = c
            rates.append(got["co-decoder"].trace["deferral_rate"])
            texts_equal.append(got["co-decoder"].text == got["naive co-decoder"].text)
        log(f"cost round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {sum(tokens[k]) / sum(times[k]):.2f} tok/s" for k in arms))
    tps = {k: sum(tokens[k]) / sum(times[k]) for k in arms}
    return {
        "threshold": eta,
        "target_rate": args.rate,
        "deferral_rate_mean": round(statistics.mean(rates), 4),
        "deferral_rate_per_prompt": [round(r, 4) for r in rates[: len(reqs)]],
        "tokens_per_s": {k: round(v, 3) for k, v in tps.items()},
        "completion_tokens": {k: sorted(set(v)) for k, v in tokens.items()},
        "co_decoder_vs_base": round(tps["co-decoder"] / tps["base alone"], 3),
        "speedup_vs_naive": round(tps["co-decoder"] / tps["naive co-decoder"], 3),
        "naive_same_text": all(texts_equal),
        "rounds": args.rounds,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["one", "zoo", "cost"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "decoding"))
    ap.add_argument("--assistant", default="arith", choices=list(ASSISTANTS))
    ap.add_argument("--train-examples", type=int, default=300)
    ap.add_argument("--init-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--train-base", default="lora", choices=["lora", "none"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--dev", type=int, default=60, help="dev questions for tuning eta")
    ap.add_argument("--rates", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="target deferral rates for tuning")
    ap.add_argument("--test", type=int, default=100, help="first N questions of the test benchmark")
    ap.add_argument("--no-routed", action="store_true", help="zoo: skip the routed system")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.2, help="cost: target deferral rate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    result = {"one": part_one, "zoo": part_zoo, "cost": part_cost}[args.part](args)
    result["part"] = args.part
    result["wall_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text if args.part == "cost" else json.dumps({k: v for k, v in result.items() if k in ("results", "wall_seconds")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
