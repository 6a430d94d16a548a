"""Routed batches over LoRA adapters of one base: one batched forward per step
(per-row adapters, collab.adapters) vs one batch per expert vs each question alone.

On the real zoo (SmolLM2-135M-Instruct and its three shipped LoRA experts
smol-arith, smol-lists, smol-units) and the zoo's shipped kNN router
(examples/zoo.yaml), a batch of skill:mixed test questions that the router sends
to the three adapters (the same number to each) is answered, in one run:

  1. batched:  the route system with ``adapter_batch: true``: one batch, every row its
               own adapter, one forward per step (finished rows leave the batch);
  2. batched, static: the same bank batch with finished rows kept (as a plain batch does);
  3. groups, unmerged: one batch per chosen expert, on the bank's per-adapter experts;
  4. groups, merged:  today's path: the route system over merged experts, one batch per expert;
  5. alone, unmerged / alone, merged: each question by itself.

It also times the two phases apart (the prefill of all prompts, and one decoding
step of all rows) for one mixed session vs one session per expert. It prints wall
times (the best of ``--reps`` rounds, the paths taking turns) and their ratios to
the batched path, how many answers equal
each question's adapter run unmerged alone (the target: all) and the merged
expert's answer alone, exact-match accuracy, and the peak memory (child
processes' max RSS, and parameter bytes) of the bank vs the three merged experts.

With ``--ccoe DIR`` (a ``bench/ccoe.py`` work directory holding experts/arith, lists
and units), CCoE joins the comparison: the same rows, each to the CCoE expert of the
adapter it was routed to, one backbone pass per step for the batch (``ccoe``), and
its memory with the three experts in a child process, so tokens/s and resident
memory of CCoE, three separate (merged) models and base + LoRA adapters come from
one run.

Usage: python bench/adapters.py [--n 12] [--max-tokens 32] [--reps 3] [--ccoe DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collab.spec import Spec

T = TypeVar("T")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
# bench/evals.py and bench/routers.py would shadow the packages of the same names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

ADAPTERS = ["arith", "lists", "units"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def zoo_spec(batch_size: int) -> Spec:
    """examples/zoo.yaml, with a second route system over the same router that batches adapters."""
    import yaml

    from collab.spec import Spec

    path = ROOT / "examples" / "zoo.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for cfg in data["experts"].values():
        cfg["batch_size"] = batch_size  # every batch below fits in one
    auto = data["systems"]["auto"]
    data["systems"]["auto_lora"] = {**auto, "adapter_batch": True}
    return Spec(data, path)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's, inherited at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(kind: str) -> None:
    """In a child process: load the bank (base + three adapters) or the three merged experts
    (or nothing: the imports' own share); print peak RSS and parameter bytes."""
    import peft  # noqa: F401 - every kind imports the same libraries before loading
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from collab.adapters import AdapterBank
    from collab.experts import Expert
    from collab.system import GenerationRequest

    probe = GenerationRequest.chat("What is 2 + 2?", max_tokens=2)
    params: dict[int, int] = {}
    if kind == "bank":
        bank = AdapterBank.from_refs({n: f"zoo:smol-{n}" for n in ADAPTERS})
        params = {p.data_ptr(): p.numel() * p.element_size() for p in bank.peft.parameters()}
        for n in ADAPTERS:  # one answer each: every weight is read (mapped weights count once touched)
            bank.expert(n).generate(probe)
    elif kind.startswith("ccoe:"):
        from collab.ccoe.gate import FixedGate
        from collab.ccoe.system import CCoESystem

        base = Expert.load("zoo:smollm2-135m-instruct", name="smol")
        system = CCoESystem.load(base, {n: Path(kind[5:]) / "experts" / n for n in ADAPTERS}, FixedGate(None), name="ccoe")
        for n in ADAPTERS:
            CCoESystem(base, system.ccoe, FixedGate(n)).generate(probe)
        params = {0: system.parameter_bytes()["total"]}
    elif kind == "merged":
        for n in ADAPTERS:
            e = Expert.load(f"zoo:smol-{n}", name=n)
            params.update({p.data_ptr(): p.numel() * p.element_size() for p in e.model.parameters()})
            e.generate(probe)
    print(json.dumps({"kind": kind, "peak_rss_mb": peak_rss_mb(), "param_mb": sum(params.values()) / 2**20}))


def measure_memory(kind: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def phase_times(bank: Any, views: dict, merged: dict, reqs: list, names: list[str], reps: int, steps: int = 6) -> dict[str, dict[str, float]]:
    """Prefill and per-step cost of the three ways to run the batch: one mixed session of all
    rows, or one session per expert (merged, or the bank's unmerged experts), whose costs add."""
    prompts = [views[n].encode(r) for n, r in zip(names, reqs)]
    groups = {n: [i for i, m in enumerate(names) if m == n] for n in ADAPTERS}

    def run(make: Callable[[], list[tuple[Any, list[int]]]]) -> tuple[float, float]:
        t0 = time.perf_counter()
        sessions = make()  # (session, its rows)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            for s, _rows in sessions:
                s.feed(s.logits.argmax(-1))
        return prefill * 1000, (time.perf_counter() - t0) * 1000 / steps

    ways = {
        "one mixed batch": lambda: [(bank.session(prompts, names), list(range(len(names))))],
        "per-expert groups, unmerged": lambda: [(views[n].session([prompts[i] for i in idx]), idx) for n, idx in groups.items()],
        "per-expert groups, merged": lambda: [(merged[n].session([prompts[i] for i in idx]), idx) for n, idx in groups.items()],
    }
    best: dict[str, dict[str, float]] = {}
    for _ in range(reps):
        for key, make in ways.items():
            pre, step = run(make)
            b = best.setdefault(key, {"prefill_ms": pre, "step_ms": step})
            b["prefill_ms"], b["step_ms"] = min(b["prefill_ms"], pre), min(b["step_ms"], step)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="questions in the routed batch (a multiple of 3: as many per adapter)")
    ap.add_argument("--max-tokens", type=int, default=32, help="as the skill benchmarks allow")
    ap.add_argument("--reps", type=int, default=3, help="rounds of every path; wall times are the best round's")
    ap.add_argument("--ccoe", default=None, help="a bench/ccoe.py work directory: add CCoE's experts (experts/arith|lists|units) to the comparison")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return 0

    import torch

    from collab import skills
    from collab.adapters import AdapterExpert
    from collab.system import GenerationRequest

    per = args.n // len(ADAPTERS)
    spec = zoo_spec(batch_size=max(8, args.n))
    log("loading the route system with adapter_batch (one SmolLM2 base + 3 adapters, gemma)")
    lora, t_load_bank = timed(lambda: spec.system("auto_lora"))
    log(f"  {t_load_bank:.1f} s; loading the route system over merged experts (today's)")
    merged, t_load_merged = timed(lambda: spec.system("auto"))
    log(f"  {t_load_merged:.1f} s")
    views = {n: lora.experts[n] for n in ADAPTERS}
    assert all(isinstance(v, AdapterExpert) for v in views.values())
    bank = views["arith"].bank

    # the batch: skill:mixed test questions the router sends to each adapter, interleaved
    pool = skills.mixed_test_set(100)
    reqs_all = [GenerationRequest.chat(ex.question, max_tokens=args.max_tokens) for ex in pool]
    routed = lora.route(reqs_all)
    chosen: dict[str, list[int]] = {n: [] for n in ADAPTERS}
    for i, (d, _) in enumerate(routed):
        name = lora.expert_names[d.ranking[0]]
        if name in chosen and len(chosen[name]) < per:
            chosen[name].append(i)
    if any(len(v) < per for v in chosen.values()):
        raise SystemExit(f"the router sends too few of skill:mixed's questions to some adapter: {chosen}")
    order = [chosen[n][k] for k in range(per) for n in ADAPTERS]
    examples = [pool[i] for i in order]
    reqs = [reqs_all[i] for i in order]
    names = [n for _ in range(per) for n in ADAPTERS]
    log(f"{len(reqs)} questions: " + ", ".join(f"{n} x{per} (skills routed there: {sorted({pool[i].skill for i in chosen[n]})})" for n in ADAPTERS))

    # warm-up: one short answer on every path, so that first-call costs fall outside the timings
    warm = [GenerationRequest.chat("2+2?", max_tokens=2)]
    lora.generate_batch(warm)
    merged.generate_batch(warm)
    for n in ADAPTERS:
        views[n].generate(warm[0])
        merged.experts[n].generate(warm[0])

    def groups(experts: dict) -> list:
        out: list = [None] * len(reqs)
        for n in ADAPTERS:
            idx = [i for i, m in enumerate(names) if m == n]
            for i, c in zip(idx, experts[n].generate_batch([reqs[i] for i in idx])):
                out[i] = c
        return out

    paths = {
        "batched": lambda: lora.generate_batch(reqs),  # RoutedSystem.generate_batch over the bank's experts
        "static": lambda: bank.generate_batch(reqs, names, drop_finished=False),
        "groups_unmerged": lambda: groups(views),
        "groups_merged": lambda: merged.generate_batch(reqs),  # today's RoutedSystem.generate_batch
        "alone_unmerged": lambda: [views[n].generate(r) for n, r in zip(names, reqs)],
        "alone_merged": lambda: [merged.experts[n].generate(r) for n, r in zip(names, reqs)],
    }
    if args.ccoe:
        from collab.ccoe.gate import GateDecision
        from collab.ccoe.system import CCoESystem

        row_of = {id(r): n for r, n in zip(reqs, names)}

        class RowGate:
            """Each row to the CCoE expert of the adapter the router chose for it."""

            def choose(self, requests: list) -> list:
                return [GateDecision(row_of[id(r)], {}, "the router's adapter") for r in requests]

            def describe(self) -> dict:
                return {"type": "rows"}

        ccoe = CCoESystem.load(merged.experts["smol"], {n: Path(args.ccoe) / "experts" / n for n in ADAPTERS}, RowGate(), name="ccoe")
        ccoe.generate_batch([reqs[0]])
        paths["ccoe"] = lambda: ccoe.generate_batch(reqs)
    outputs: dict[str, list] = {}
    walls: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(args.reps):  # the paths take turns, so the machine's noise hits each alike
        log(f"round {rep + 1}/{args.reps}: " + ", ".join(paths))
        for key, fn in paths.items():
            out, t = timed(fn)
            walls[key].append(t)
            if key in outputs:
                assert [c.text for c in out] == [c.text for c in outputs[key]], f"{key}: greedy answers changed between rounds"
            outputs[key] = out
    batched, static, groups_unmerged, groups_merged, alone_unmerged, alone_merged = (outputs[k] for k in list(paths)[:6])
    t_batched, t_static, t_groups_unmerged, t_groups_merged, t_alone_unmerged, t_alone_merged = (min(walls[k]) for k in list(paths)[:6])
    assert [c.trace["routed_to"] for c in batched] == names and all(c.trace["expert_trace"].get("mixed_batch") for c in batched)
    assert [c.trace["routed_to"] for c in groups_merged] == names

    log(f"the phases: prefill of the {len(reqs)} prompts, and one decoding step of {len(reqs)} rows")
    phases = phase_times(bank, views, merged.experts, reqs, names, args.reps)

    log("memory: the bank vs the three merged experts, each loaded in a child process")
    mem_bank = measure_memory("bank")
    mem_merged = measure_memory("merged")
    mem_none = measure_memory("none")
    mem_ccoe = measure_memory(f"ccoe:{Path(args.ccoe).resolve()}") if args.ccoe else None

    def texts(cs: list) -> list[str]:
        return [c.text for c in cs]

    def same(a: list, b: list) -> int:
        return sum(x == y for x, y in zip(texts(a), texts(b)))

    def acc(cs: list) -> float:
        return sum(skills.check(ex.skill, c.text, ex.answer) for ex, c in zip(examples, cs)) / len(cs)

    rows = [
        ("batched (per-row adapters, finished rows leave)", batched, t_batched),
        ("batched, static (finished rows stay)", static, t_static),
        ("groups, unmerged (one batch per expert)", groups_unmerged, t_groups_unmerged),
        ("groups, merged (today's path)", groups_merged, t_groups_merged),
        ("alone, unmerged", alone_unmerged, t_alone_unmerged),
        ("alone, merged", alone_merged, t_alone_merged),
    ]
    if args.ccoe:
        rows.append(("ccoe (its experts, one backbone pass per step)", outputs["ccoe"], min(walls["ccoe"])))
    n = len(reqs)
    tokens = sum(c.usage.completion_tokens for c in batched)
    print(f"\nRouted batch of {n} skill:mixed questions ({per} each to {', '.join(ADAPTERS)}; zoo kNN router), greedy, max_tokens {args.max_tokens}, "
          f"{tokens} answer tokens; torch threads {torch.get_num_threads()}; wall time: best of {args.reps} rounds")
    print(f"{'path':50} {'wall s':>7} {'x batched':>9} {'= unmerged alone':>17} {'= merged alone':>15} {'exact match':>11}")
    result_rows = []
    for label, cs, t in rows:
        r = {"path": label, "wall_s": round(t, 2), "ratio_to_batched": round(t / t_batched, 2), "equal_unmerged_alone": same(cs, alone_unmerged),
             "equal_merged_alone": same(cs, alone_merged), "exact_match": round(acc(cs), 3)}
        result_rows.append(r)
        print(f"{label:50} {t:7.2f} {t / t_batched:9.2f} {r['equal_unmerged_alone']:>13}/{n:<3} {r['equal_merged_alone']:>11}/{n:<3} {r['exact_match']:11.3f}")
    print(f"\nspeed-up of the batched path: {t_groups_merged / t_batched:.2f}x over today's per-expert groups (merged), "
          f"{t_groups_unmerged / t_batched:.2f}x over per-expert groups on the same bank, {t_alone_merged / t_batched:.2f}x over each question alone (merged)")
    print(f"memory (child max RSS; parameters): bank (base + 3 adapters) {mem_bank['peak_rss_mb']:.0f} MB ({mem_bank['param_mb']:.0f} MB params), "
          f"3 merged experts {mem_merged['peak_rss_mb']:.0f} MB ({mem_merged['param_mb']:.0f} MB params), imports only {mem_none['peak_rss_mb']:.0f} MB; "
          f"over imports: {mem_bank['peak_rss_mb'] - mem_none['peak_rss_mb']:.0f} vs {mem_merged['peak_rss_mb'] - mem_none['peak_rss_mb']:.0f} MB "
          f"({(mem_merged['peak_rss_mb'] - mem_none['peak_rss_mb']) / max(1.0, mem_bank['peak_rss_mb'] - mem_none['peak_rss_mb']):.2f}x)")
    if mem_ccoe is not None:
        print(f"memory, CCoE (base + 3 experts' top layers): {mem_ccoe['peak_rss_mb']:.0f} MB ({mem_ccoe['param_mb']:.0f} MB params); over imports {mem_ccoe['peak_rss_mb'] - mem_none['peak_rss_mb']:.0f} MB")
        print("tokens/s: " + "; ".join(f"{label} {sum(c.usage.completion_tokens for c in cs) / t:.1f}" for label, cs, t in rows if label.startswith(("batched (", "groups, merged", "ccoe"))))
    print("where the time goes (best of rounds; ms): " + "; ".join(f"{k}: prefill {v['prefill_ms']:.0f}, one step {v['step_ms']:.0f}" for k, v in phases.items()))
    differ = [i for i in range(n) if batched[i].text != alone_merged[i].text]
    for i in differ[:3]:
        print(f"  differs from merged alone [{names[i]}]: {examples[i].question!r}: batched {batched[i].text!r} vs merged {alone_merged[i].text!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": n, "per_adapter": per, "max_tokens": args.max_tokens, "reps": args.reps, "answer_tokens": tokens, "rows": result_rows, "walls_s": walls,
                                               "memory": {"bank": mem_bank, "merged": mem_merged, "imports": mem_none, "ccoe": mem_ccoe}, "phases_ms": phases,
                                               "load_s": {"bank_route_system": t_load_bank, "merged_route_system": t_load_merged}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
