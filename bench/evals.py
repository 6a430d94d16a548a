"""Benchmark of the evals package, on SmolLM2-135M-Instruct (CPU).

1. Runner throughput (target >= 2x): arc_easy scored by log-likelihood one
   request at a time, one example at a time and 8 examples at a time; gsm8k
   generated in batches of 8 vs one at a time (examples per second, ratios).
2. Parity with lm-evaluation-harness: collab's runner and lm-eval (through the
   ``collab`` model type, on the same exported examples and prompts) on
   arc_easy (log-likelihood) and gsm8k (generation); the scores must agree
   within collab's bootstrap 95% interval.

    .venv/bin/python bench/evals.py [--tp-arc 40] [--tp 8] [--tp-tokens 32] [--gsm8k 8] [--arc 40] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# This file is called evals.py: keep bench/ off the path so `import evals` is the package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--tp-arc", type=int, default=40, help="arc_easy examples for the log-likelihood throughput comparison")
    ap.add_argument("--tp", type=int, default=8, help="gsm8k examples for the generation throughput comparison")
    ap.add_argument("--tp-tokens", type=int, default=32, help="generated tokens per example in the throughput comparison")
    ap.add_argument("--gsm8k", type=int, default=8, help="gsm8k examples for the lm-eval comparison")
    ap.add_argument("--max-tokens", type=int, default=128, help="gsm8k generation length in the lm-eval comparison")
    ap.add_argument("--arc", type=int, default=40, help="arc_easy examples for the lm-eval comparison")
    args = ap.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from collab.experts import Expert
    from evals.lm_eval_adapter import CollabLM
    from evals.lm_eval_tasks import write_task
    from evals.runner import evaluate

    expert = Expert.load(args.model)
    print(f"model {args.model}; torch threads {__import__('torch').get_num_threads()}")

    # 1. throughput ------------------------------------------------------------
    # Multiple choice (log-likelihood): one request at a time with no sharing
    # (how a naive loop or lm-eval's batch_size=1 scores), one example at a time
    # (its choices share one pass over the question), and batches of 8 examples.
    mc = {}
    for label, bs, share in (("per request", 1, False), ("per example", 1, True), ("batch 8", 8, True)):
        expert.share_context = share
        t0 = time.perf_counter()
        r = evaluate(expert, "arc_easy", limit=args.tp_arc, batch_size=bs, progress=False)
        dt = time.perf_counter() - t0
        mc[label] = (r.n / dt, r.metrics["acc"]["mean"])
        print(f"throughput arc_easy x{r.n} (log-likelihood) {label}: {dt:.1f} s, {mc[label][0]:.3f} examples/s, acc {mc[label][1]:.3f}")
    expert.share_context = True
    print(f"batching speed-up, arc_easy: batch 8 vs per request {mc['batch 8'][0] / mc['per request'][0]:.2f}x, "
          f"vs per example {mc['batch 8'][0] / mc['per example'][0]:.2f}x")
    rates = {}
    for bs in (1, 8):
        t0 = time.perf_counter()
        r = evaluate(expert, "gsm8k", limit=args.tp, batch_size=bs, max_tokens=args.tp_tokens, progress=False)
        dt = time.perf_counter() - t0
        rates[bs] = r.n / dt
        print(f"throughput gsm8k x{r.n}, {args.tp_tokens} tokens: batch_size={bs}: {dt:.1f} s, {rates[bs]:.3f} examples/s, {r.tokens['completion']} generated tokens")
    print(f"batching speed-up, gsm8k generation (8 vs 1): {rates[8] / rates[1]:.2f}x")

    # 2. parity with lm-eval -----------------------------------------------------
    with tempfile.TemporaryDirectory() as tasks:
        arc_task = write_task("arc_easy", tasks, limit=args.arc)
        gsm_task = write_task("gsm8k", tasks, limit=args.gsm8k, max_tokens=args.max_tokens)
        tm = TaskManager(include_path=tasks)
        lm = CollabLM(system=expert, batch_size=8)
        rows = []
        for bench, task, limit, metric, chat in (("arc_easy", arc_task, args.arc, "acc", False), ("gsm8k", gsm_task, args.gsm8k, "score", True)):
            t0 = time.perf_counter()
            ours = evaluate(expert, bench, limit=limit, batch_size=8, max_tokens=args.max_tokens if bench == "gsm8k" else None, progress=False)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, apply_chat_template=chat)
            t_theirs = time.perf_counter() - t0
            theirs = out["results"][task][f"{metric},none"]
            inside = ours.ci_low - 1e-9 <= theirs <= ours.ci_high + 1e-9
            rows.append((bench, limit, ours.score, ours.ci_low, ours.ci_high, theirs, inside, t_ours, t_theirs))
            if bench == "arc_easy":
                norm = out["results"][task]["acc_norm,none"]
                print(f"arc_easy acc_norm: collab {ours.metrics['acc_norm']['mean']:.3f}, lm-eval {norm:.3f}")
    print("\nbenchmark  n   collab score [95% CI]      lm-eval   agree  collab s  lm-eval s")
    for bench, n, s, lo, hi, theirs, inside, t1, t2 in rows:
        print(f"{bench:<10} {n:<3} {s:.3f} [{lo:.3f}, {hi:.3f}]      {theirs:.3f}     {'yes' if inside else 'NO'}    {t1:7.1f}  {t2:7.1f}")


if __name__ == "__main__":
    main()
