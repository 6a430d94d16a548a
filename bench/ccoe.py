"""CCoE on the real zoo base: one expert per skill on SmolLM2's shared backbone.

Steps, each resumable (everything is kept under --work; rerun the same command to
continue where it stopped):

1. ``train``: one CCoE expert per zoo skill (arith, lists, units): the base's top
   --layers layers trained fully on the skill's training split, the rest frozen
   (``collab ccoe train``); steps per skill as the zoo's LoRA experts got them
   (arith 150, lists 60, units 60) unless --steps is given.
2. ``gate``: a kNN router (TF-IDF by default) over the three branch names, trained
   on skill:mixed-dev questions labelled with their skill (disjoint from the test
   questions): the gate of ``type: ccoe``.
3. ``pop``: each expert popped into a standalone model (``collab ccoe pop``), for
   the parity check and the memory comparison.
4. ``eval``: the base vs each expert on its own skill (skill:arith|lists|units),
   and on skill:mixed the base, CCoE gated by the true skill (an oracle gate) and
   CCoE gated by the router; 95% bootstrap intervals (``evals.runner``). A parity
   check: CCoE's answers equal each popped expert's own on the first --parity
   questions of its skill.
5. ``memory``: parameter bytes and peak RSS (VmHWM) of CCoE with 3 experts vs 3
   separate full models (each in a fresh process, loading and answering one query
   per expert).

Usage: python bench/ccoe.py [--work runs/ccoe] [--layers 8] [--steps N] [--limit N]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
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
SKILLS = ("arith", "lists", "units")


def fmt(m: float, lo: float, hi: float) -> str:
    return f"{100 * m:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]"


# ------------------------------------------------------------------ training
def train_experts(base: Any, args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """One expert per skill under work/experts (kept if already there; resumed if interrupted)."""
    from collab.ccoe.train import CCoETrainConfig, train_expert
    from collab.zoo_build import SKILL_STEPS

    out = {}
    for skill in SKILLS:
        steps = args.steps if args.steps is not None else SKILL_STEPS.get(skill, 100)
        cfg = CCoETrainConfig(
            layers=args.layers,
            steps=steps,
            batch_size=args.batch_size,
            lr=args.lr,
            examples=args.examples,
            max_tokens=args.max_tokens,
        )
        target = work / "experts" / skill
        cmd = (
            f"collab ccoe train --base {BASE} --skill {skill} --layers {cfg.layers} --out {target} --steps {cfg.steps} "
            f"--batch-size {cfg.batch_size} --lr {cfg.lr} --examples {cfg.examples} --max-tokens {cfg.max_tokens}"
        )
        if not (target / "config.json").is_file():
            log(f"train: {cmd}")
            train_expert(
                base, f"skill:{skill}", target, cfg, progress=training_progress()
            )
        m = json.loads((target / "config.json").read_text())["metrics"]
        log(
            f"  {skill}: {m['seconds']} s, loss {m['first_loss']} -> {m['final_loss']}, {m['trainable_parameters']:,} trainable"
        )
        out[skill] = target
    return out


def train_gate(work: Path, args: argparse.Namespace) -> Path:
    """A router over the branch names, trained on skill:mixed-dev questions by their skill."""
    from collab import skills
    from routers.base import make_router
    from routers.table import RoutingTable

    out = work / "gate"
    if (out / "config.json").is_file():
        return out
    rows = [
        {
            "id": e.id,
            "task": e.skill,
            "prompt": e.question,
            "scores": {s: float(s == e.skill) for s in SKILLS},
            "costs": dict.fromkeys(SKILLS, 1.0),
        }
        for e in skills.mixed_dev_set(args.gate_examples)
    ]
    log(
        f"gate: a kNN router ({args.gate_encoder}) over {', '.join(SKILLS)} on {len(rows)} skill:mixed-dev questions"
    )
    router = make_router("knn", encoder=args.gate_encoder, k=10).fit(
        RoutingTable.from_rows(rows, source="skill:mixed-dev")
    )
    return router.save(out)


def pop_all(base: Any, experts: dict[str, Path], work: Path) -> dict[str, Path]:
    from collab.ccoe.standalone import pop_expert

    out = {}
    for skill, d in experts.items():
        target = work / "popped" / skill
        if not (target / "collab_ccoe.json").is_file():
            log(f"pop: {d} -> {target}")
            pop_expert(d, target, base=base, overwrite=target.exists())
        out[skill] = target
    return out


def write_spec(work: Path, experts: dict[str, Path], gate: Path) -> Path:
    """The spec the runs correspond to (for ``collab eval`` / ``collab serve``)."""
    import yaml

    from collab.io import atomic_write_text

    branches = {s: str(d.relative_to(work)) for s, d in experts.items()}
    systems: dict[str, Any] = {
        "ccoe": {
            "type": "ccoe",
            "base": "smol",
            "branches": branches,
            "gate": str(gate.relative_to(work)),
        }
    }
    for s in SKILLS:
        systems[f"ccoe-{s}"] = {
            "type": "ccoe",
            "base": "smol",
            "branches": branches,
            "gate": {"branch": s},
        }
    path = work / "spec.yaml"
    atomic_write_text(
        path,
        yaml.safe_dump(
            {"experts": {"smol": {"ref": BASE}}, "systems": systems}, sort_keys=False
        ),
    )
    return path


# ------------------------------------------------------------------ evaluation
class TrueSkill:
    """The oracle gate: each skill:mixed question to the expert of its own skill."""

    def __init__(self) -> None:
        from evals.benchmarks import get_benchmark

        self.of = {
            e.question: e.meta["skill"] for e in get_benchmark("skill:mixed").examples()
        }

    def choose(self, requests: Sequence[Any]) -> list[Any]:
        from collab.ccoe.gate import GateDecision

        return [
            GateDecision(
                self.of[r.text_for_routing(last_turn_only=True)],
                {},
                "the question's skill",
            )
            for r in requests
        ]

    def describe(self) -> dict[str, Any]:
        return {"type": "true-skill"}


def run_eval(system: Any, bench: str, limit: int | None, runs: Path) -> dict[str, Any]:
    from evals.runner import evaluate

    log(f"evaluate {system.name} on {bench}" + (f" (first {limit})" if limit else ""))
    res = evaluate(
        system,
        bench,
        limit=limit,
        out_dir=runs / bench.replace(":", "-") / system.name,
        progress=False,
    )
    entry: dict[str, Any] = {
        "score": res.score,
        "ci": [res.ci_low, res.ci_high],
        "text": fmt(res.score, res.ci_low, res.ci_high),
        "n": res.n,
        "seconds": round(res.seconds, 1),
    }
    if res.groups:
        entry["groups"] = {
            g: round(v.get("score", v.get("exact_match", 0.0)), 4)
            if isinstance(v, dict)
            else v
            for g, v in res.groups.items()
        }
    branches = [
        r["trace"].get("branch")
        for r in res.records
        if isinstance(r.get("trace"), dict) and r["trace"].get("type") == "ccoe"
    ]
    if branches:
        entry["branch_share"] = {
            b: round(branches.count(b) / len(branches), 4)
            for b in sorted(set(branches))
        }
    log(f"  {system.name} on {bench}: {entry['text']}")
    return entry


def parity(system: Any, popped: dict[str, Path], n: int, work: Path) -> dict[str, Any]:
    """Whether CCoE (gated to each skill's expert) answers as the popped expert does,
    on n questions per skill (kept in work/parity.json)."""
    from collab.ccoe.gate import FixedGate
    from collab.ccoe.system import CCoESystem
    from collab.experts import Expert
    from collab.io import atomic_write_json
    from evals.benchmarks import get_benchmark

    path = work / "parity.json"
    if path.is_file() and json.loads(path.read_text()).get("questions") == n:
        return json.loads(path.read_text())["skills"]
    out = {}
    for skill, d in popped.items():
        bench = get_benchmark(f"skill:{skill}")
        reqs = [bench.request(e) for e in bench.examples(n)]
        fixed = CCoESystem(
            system.base, system.ccoe, FixedGate(skill), name=f"ccoe-{skill}"
        )
        alone = Expert.load(d, name=f"{skill}-popped")
        ours, theirs = fixed.generate_batch(reqs), alone.generate_batch(reqs)
        out[skill] = {
            "questions": n,
            "equal": sum(a.text == b.text for a, b in zip(ours, theirs)),
        }
        log(
            f"  parity {skill}: {out[skill]['equal']}/{n} answers equal to the popped expert's"
        )
        del alone
    atomic_write_json(path, {"questions": n, "skills": out})
    return out


def evaluate_all(
    base: Any,
    experts: dict[str, Path],
    gate: Path,
    popped: dict[str, Path],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    from collab.ccoe.gate import FixedGate
    from collab.ccoe.system import CCoESystem

    runs = work / "runs"
    routed = CCoESystem.load(base, experts, gate, name="ccoe-router")
    share = routed.ccoe  # one copy of the branches for every gate
    results: dict[str, Any] = {"own_skill": {}, "mixed": {}}
    for skill in SKILLS:
        fixed = CCoESystem(base, share, FixedGate(skill), name=f"ccoe-{skill}")
        b, e = (
            run_eval(base, f"skill:{skill}", args.limit, runs),
            run_eval(fixed, f"skill:{skill}", args.limit, runs),
        )
        results["own_skill"][skill] = {
            "base": b,
            "expert": e,
            "gain_points": round(100 * (e["score"] - b["score"]), 1),
        }
    results["mixed"]["base"] = run_eval(base, "skill:mixed", args.limit, runs)
    results["mixed"]["ccoe-true-skill"] = run_eval(
        CCoESystem(base, share, TrueSkill(), name="ccoe-true-skill"),
        "skill:mixed",
        args.limit,
        runs,
    )
    results["mixed"]["ccoe-router"] = run_eval(routed, "skill:mixed", args.limit, runs)
    results["parity"] = parity(routed, popped, args.parity, work)
    return results


# ---------------------------------------------------------------------- memory
_MEASURE = r"""
import json, sys
from collab.ccoe.model import parameter_bytes
from collab.experts import Expert
from collab.system import GenerationRequest
mode, base_ref, dirs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
qs = {"arith": "What is 123 + 456?", "lists": "Sort these numbers from smallest to largest: 5, 2, 9", "units": "Convert 3 km to m."}
if mode == "ccoe":
    from collab.ccoe.gate import FixedGate
    from collab.ccoe.system import CCoESystem
    base = Expert.load(base_ref, name="smol")
    system = CCoESystem.load(base, dirs, FixedGate(None), name="ccoe")
    for s in dirs:
        CCoESystem(base, system.ccoe, FixedGate(s)).generate(GenerationRequest.chat(qs[s], max_tokens=8))
    params = system.parameter_bytes()["total"]
else:
    models = {s: Expert.load(d, name=s) for s, d in dirs.items()}
    for s, e in models.items():
        e.generate(GenerationRequest.chat(qs[s], max_tokens=8))
    params = sum(parameter_bytes([e.model]) for e in models.values())
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda k: int(status[k].split()[0]) * 1024
print(json.dumps({"parameter_bytes": params, "peak_rss_bytes": kb("VmHWM"), "rss_bytes": kb("VmRSS")}))
"""


def memory(
    experts: dict[str, Path], popped: dict[str, Path], work: Path
) -> dict[str, Any]:
    """CCoE with the three experts vs the three popped models, each measured in a fresh process."""
    path = work / "memory.json"
    if path.is_file():
        return json.loads(path.read_text())
    out: dict[str, Any] = {}
    for mode, dirs in (("ccoe", experts), ("separate", popped)):
        log(f"memory: {mode} ({', '.join(dirs)}) in a fresh process")
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _MEASURE,
                mode,
                BASE,
                json.dumps({s: str(d) for s, d in dirs.items()}),
            ],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"memory measurement ({mode}) failed:\n{proc.stderr[-2000:]}"
            )
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("parameter_bytes", "peak_rss_bytes", "rss_bytes"):
        out[f"{key}_saving"] = round(1 - out["ccoe"][key] / out["separate"][key], 4)
    from collab.io import atomic_write_json

    atomic_write_json(path, out)
    return out


# ------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--work",
        default="runs/ccoe",
        help="Where the experts, the gate, the popped models and the runs are kept.",
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=8,
        help="Each expert's own top layers (of SmolLM2's 30).",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Training steps per expert (default: arith 150, lists 60, units 60).",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--lr",
        type=float,
        default=3e-4,
        help="Peak learning rate (3e-4 learned lists faster than 1e-4 in a 20-step check).",
    )
    ap.add_argument(
        "--examples", type=int, default=1000, help="Training conversations per skill."
    )
    ap.add_argument(
        "--max-tokens", type=int, default=64, help="Longest training sequence."
    )
    ap.add_argument(
        "--gate-examples",
        type=int,
        default=100,
        help="skill:mixed-dev questions per skill for the gate's router.",
    )
    ap.add_argument(
        "--gate-encoder",
        default="tfidf",
        help="The gate router's encoder: tfidf or minilm.",
    )
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="First N examples of every benchmark (default: all; 200 per skill, 300 mixed).",
    )
    ap.add_argument(
        "--parity",
        type=int,
        default=8,
        help="Questions per skill on which CCoE and the popped expert are compared.",
    )
    ap.add_argument("--json", default=None, help="Also write the summary here.")
    args = ap.parse_args(argv)

    from collab.experts import Expert
    from collab.io import atomic_write_json

    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Expert.load(BASE, name="smol")
    experts = train_experts(base, args, work)
    gate = train_gate(work, args)
    popped = pop_all(base, experts, work)
    spec = write_spec(work, experts, gate)
    summary: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "training": {
            s: {
                k: v
                for k, v in json.loads((d / "config.json").read_text())[
                    "metrics"
                ].items()
                if k != "losses"
            }
            for s, d in experts.items()
        },
        "results": evaluate_all(base, experts, gate, popped, args, work),
        "memory": memory(experts, popped, work),
        "spec": str(spec),
        "eval_command": f"collab eval {spec} --system ccoe --bench skill:mixed"
        + (f" --limit {args.limit}" if args.limit else ""),
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(work / "summary.json", summary)
    if args.json:
        atomic_write_json(args.json, summary)
    r = summary["results"]
    print("\nown skill (exact match %, 95% CI):")
    for s, v in r["own_skill"].items():
        print(
            f"  skill:{s:6s} base {v['base']['text']:18s} expert {v['expert']['text']:18s} ({v['gain_points']:+.1f} points)"
        )
    print("skill:mixed:")
    for name, v in r["mixed"].items():
        print(
            f"  {name:16s} {v['text']}"
            + (f"  branches {v['branch_share']}" if "branch_share" in v else "")
        )
    m = summary["memory"]
    print(
        f"memory, CCoE (3 experts) vs 3 separate models: parameters {m['ccoe']['parameter_bytes'] / 2**20:.0f} vs {m['separate']['parameter_bytes'] / 2**20:.0f} MiB "
        f"({m['parameter_bytes_saving']:.0%} less), peak RSS {m['ccoe']['peak_rss_bytes'] / 2**20:.0f} vs {m['separate']['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"({m['peak_rss_bytes_saving']:.0%} less)"
    )
    print(
        f"parity with the popped experts: {r['parity']}; {summary['seconds']} s in all; summary in {work / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
