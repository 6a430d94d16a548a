"""Speculative decoding on the zoo: speed against the verifier alone, same output.

Measured side by side in one run, the arms alternating (and their order flipping
every repetition) so that machine noise hits them alike:

  1. ``lookup``: SmolLM2-135M-Instruct alone vs speculative decoding with n-gram
     prompt lookup, on tasks that copy from their prompt (correct the spelling of
     a paragraph, extract the sentences that mention a word). Target: >= 1.5x
     tokens/s with identical output.
  2. ``model``: the same verifier with a domain expert as drafter (default
     zoo:smol-arith, a LoRA fine-tune of SmolLM2 with its tokenizer), on the copy
     tasks and on open prompts: the speed-up or slow-down and the acceptance rate.
  3. ``batch``: four copy-task prompts at once, verifier generate_batch vs
     speculative generate_batch (each row keeps its own number of tokens per step).

Greedy decoding throughout; each arm reports tokens/s (median over repetitions),
the paired ratio, whether every output equals the verifier's, the acceptance rate
and verifier forward passes per token. The run stops starting new repetitions
once --budget-s seconds have passed.

Usage: python bench/speculative.py [--device cpu|cuda] [--max-tokens 160] [--reps 3]
       [--drafter zoo:smol-arith] [--parts lookup,model,batch] [--budget-s 900] [--json OUT]
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
sys.path.insert(0, str(ROOT))
from bench.common import log

VERIFIER = "zoo:smollm2-135m-instruct"

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more then two hundred years. Every night its keeper climed "
    "the narrow stairs to light the lamp, and every morning he wrote the wether in a thick leather book. Sailors "
    "trusted the beam to gide them past the rocks, and fishermen told storys about the keeper who never slept. "
    "When the lamp was finaly replaced by an automatic light, the town kept the book in its libary, where children "
    "still read about the storms of the past."
)
REPORT = (
    "The committee met on Monday to review the budget. Maria presented the figures for the new library. "
    "The roof of the school needs repairs before winter. Maria also proposed a reading program for children. "
    "The park will get new benches in the spring. Several members asked Maria how the program would be funded. "
    "The meeting ended at nine in the evening."
)
COPY_TASKS = [
    f"Rewrite this paragraph, correcting the spelling mistakes. Change nothing else.\n\n{PARAGRAPH}",
    f"Extract every sentence that mentions Maria from the text below, one per line, word for word.\n\n{REPORT}",
    f"Repeat the following text exactly, then say 'Done.'\n\n{REPORT}",
]
OPEN_PROMPTS = [
    "What is 17 + 25? Explain the steps.",
    "Write a short story about a robot who learns to paint.",
]


def run_arm(system: Any, requests: list[Any], batch: bool) -> tuple[list[Any], float]:
    t0 = time.perf_counter()
    out = system.generate_batch(requests) if batch else [system.generate(r) for r in requests]
    return out, time.perf_counter() - t0


def compare(name: str, plain: Any, spec: Any, requests: list[Any], reps: int, deadline: float, batch: bool = False) -> dict[str, Any]:
    """Alternate ``plain`` and ``spec`` on ``requests`` for ``reps`` repetitions (after one
    warm-up each); tokens/s per arm, the paired ratio, identity and acceptance."""
    run_arm(plain, requests[:1], False)
    run_arm(spec, requests[:1], False)
    tps: dict[str, list[float]] = {"plain": [], "spec": []}
    ratios: list[float] = []
    identical = True
    traces: list[dict[str, Any]] = []
    tokens = 0
    for rep in range(reps):
        if rep and time.time() > deadline:
            log(f"  {name}: time budget spent after {rep} repetition(s)")
            break
        order = [("plain", plain), ("spec", spec)] if rep % 2 == 0 else [("spec", spec), ("plain", plain)]
        done: dict[str, tuple[list[Any], float]] = {}
        for arm, system in order:
            done[arm] = run_arm(system, requests, batch)
        for arm, (outs, secs) in done.items():
            tps[arm].append(sum(c.usage.completion_tokens for c in outs) / secs)
        ratios.append(tps["spec"][-1] / tps["plain"][-1])
        plain_out, spec_out = done["plain"][0], done["spec"][0]
        identical &= [c.text for c in plain_out] == [c.text for c in spec_out]
        traces = [c.trace for c in spec_out]
        tokens = sum(c.usage.completion_tokens for c in spec_out)
        log(f"  {name} rep {rep + 1}: verifier {tps['plain'][-1]:.1f} tok/s, speculative {tps['spec'][-1]:.1f} tok/s, ratio {ratios[-1]:.2f}")
    drafted = sum(t["drafted"] for t in traces)
    accepted = sum(t["accepted"] for t in traces)
    passes = sum(t["verifier_passes"] for t in traces)
    return {
        "verifier_tokens_per_s": round(statistics.median(tps["plain"]), 2),
        "speculative_tokens_per_s": round(statistics.median(tps["spec"]), 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "identical_output": identical,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "verifier_passes_per_token": round(passes / tokens, 4) if tokens else None,
        "tokens": tokens,
        "repetitions": len(ratios),
        "prompts": len(requests),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--drafter", default="zoo:smol-arith", help="the model drafter (needs SmolLM2's tokenizer)")
    ap.add_argument("--gamma", type=int, default=8, help="lookup draft length (adaptive, the most)")
    ap.add_argument("--model-gamma", type=int, default=4, help="model-drafter draft length")
    ap.add_argument("--parts", default="lookup,model,batch")
    ap.add_argument("--budget-s", type=float, default=900.0, help="no new repetition starts after this many seconds")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    import torch

    from collab.experts import Expert
    from collab.system import GenerationRequest
    from decoding.speculative import LOOKUP, SpeculativeConfig, SpeculativeDecoder

    torch.set_grad_enabled(False)
    start = time.time()
    deadline = start + args.budget_s
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    log(f"load {VERIFIER} on {args.device} ({args.dtype})")
    smol = Expert.load(VERIFIER, name="smol", device=args.device, dtype=args.dtype, batch_size=4)
    copy_reqs = [GenerationRequest.chat(p, max_tokens=args.max_tokens) for p in COPY_TASKS]
    open_reqs = [GenerationRequest.chat(p, max_tokens=args.max_tokens) for p in OPEN_PROMPTS]
    results: dict[str, Any] = {
        "verifier": VERIFIER,
        "device": args.device,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "command": "python bench/speculative.py " + " ".join(sys.argv[1:]),
    }
    lookup = SpeculativeDecoder(smol, LOOKUP, SpeculativeConfig(gamma=args.gamma, adaptive=True), name="lookup")
    if "lookup" in parts:
        log(f"lookup drafter (gamma <= {args.gamma}, adaptive) on {len(copy_reqs)} copy tasks")
        results["lookup"] = compare("lookup", smol, lookup, copy_reqs, args.reps, deadline)
    if "model" in parts:
        log(f"load drafter {args.drafter}")
        drafter = Expert.load(args.drafter, name="drafter", device=args.device, dtype=args.dtype)
        model = SpeculativeDecoder(smol, drafter, SpeculativeConfig(gamma=args.model_gamma), name="model")
        log(f"model drafter {args.drafter} (gamma {args.model_gamma}) on the copy tasks and {len(open_reqs)} open prompts")
        results["model"] = {
            "drafter": args.drafter,
            "gamma": args.model_gamma,
            "copy_tasks": compare("model/copy", smol, model, copy_reqs, args.reps, deadline),
            "open_prompts": compare("model/open", smol, model, open_reqs, args.reps, deadline),
        }
    if "batch" in parts:
        reqs = (copy_reqs * 2)[:4]
        log("batch of 4 copy tasks: generate_batch, verifier vs lookup")
        results["batch"] = compare("batch", smol, lookup, reqs, max(1, args.reps - 1), deadline, batch=True)
    results["seconds"] = round(time.time() - start, 1)

    print("\nspeculative decoding, tokens/s relative to the verifier alone (greedy):")
    rows = [("lookup, copy tasks", results.get("lookup")), ("batch of 4, lookup", results.get("batch"))]
    if "model" in results:
        rows += [(f"{args.drafter}, copy tasks", results["model"]["copy_tasks"]), (f"{args.drafter}, open prompts", results["model"]["open_prompts"])]
    for label, r in rows:
        if r is None:
            continue
        acc = "n/a" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        print(
            f"  {label:34s} {r['ratio']:.2f}x  ({r['speculative_tokens_per_s']:.1f} vs {r['verifier_tokens_per_s']:.1f} tok/s), "
            f"acceptance {acc}, verifier passes/token {r['verifier_passes_per_token']}, identical output: {r['identical_output']}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
