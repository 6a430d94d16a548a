"""Generation benchmark for collab.experts.Expert on the real SmolLM2-135M-Instruct.

Prints, measured side by side in one run (the machine is shared, so only the
ratios mean much):
  1. tokens/s of Expert.generate vs transformers' raw model.generate on the same prompt (target >= 0.95),
  2. batched generation of 8 prompts vs 8 sequential calls (target >= 4x),
  3. generate_batch of 8 vs transformers' raw model.generate on the same padded batch (target >= 0.95),
  4. load time of the zoo GGUF expert: first load (de-quantise) vs cached (target <= 3 s).

Usage: python bench/generate.py [--reps 5] [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.prompts import PROMPTS  # noqa: E402


def bench_single(expert, reps: int, max_tokens: int) -> dict:
    import torch

    from collab.system import GenerationRequest

    req = GenerationRequest.chat(PROMPTS[0], max_tokens=max_tokens)
    ids = torch.tensor([expert.encode(req)])
    raw_kw = dict(max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=expert.tokenizer.pad_token_id, eos_token_id=expert.eos_token_ids)
    collab_tps, raw_tps = [], []
    expert.generate(req)  # warm-up
    for _ in range(reps):
        # alternate the two so that machine noise hits both alike
        t0 = time.perf_counter()
        c = expert.generate(req)
        collab_tps.append(c.usage.completion_tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = expert.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **raw_kw)
        raw_tps.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    same = c.usage.completion_tokens == out.shape[1] - ids.shape[1]
    return {
        "collab_tokens_per_s": statistics.median(collab_tps),
        "raw_tokens_per_s": statistics.median(raw_tps),
        "ratio": statistics.median(collab_tps) / statistics.median(raw_tps),
        "same_token_count": same,
        "tokens": c.usage.completion_tokens,
    }


def bench_batch(expert, reps: int, max_tokens: int) -> dict:
    from collab.system import GenerationRequest

    reqs = [GenerationRequest.chat(p, max_tokens=max_tokens) for p in PROMPTS]
    seq_t, batch_t = [], []
    seq_tokens = batch_tokens = 0
    for _ in range(max(1, reps // 2)):
        t0 = time.perf_counter()
        seq = [expert.generate(r) for r in reqs]
        seq_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batch = expert.generate_batch(reqs)
        batch_t.append(time.perf_counter() - t0)
        seq_tokens = sum(c.usage.completion_tokens for c in seq)
        batch_tokens = sum(c.usage.completion_tokens for c in batch)
    agree = sum(a.text == b.text for a, b in zip(seq, batch))
    return {
        "sequential_s": statistics.median(seq_t),
        "batched_s": statistics.median(batch_t),
        "sequential_tokens_per_s": seq_tokens / statistics.median(seq_t),
        "batched_tokens_per_s": batch_tokens / statistics.median(batch_t),
        "speedup": statistics.median(seq_t) / statistics.median(batch_t),
        "identical_outputs": f"{agree}/{len(reqs)}",
    }


def bench_batch_raw(expert, reps: int, max_tokens: int) -> dict:
    """generate_batch of 8 vs transformers' raw model.generate on the same left-padded
    batch, alternating: the decoding loop's own cost at batch 8 (target >= 0.95)."""
    import torch

    from collab.system import GenerationRequest

    reqs = [GenerationRequest.chat(p, max_tokens=max_tokens) for p in PROMPTS]
    enc = [expert.encode(r) for r in reqs]
    width = max(len(e) for e in enc)
    pad = expert.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    raw_kw = dict(max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=pad, eos_token_id=expert.eos_token_ids)
    collab_t, raw_t = [], []
    for _ in range(max(1, reps // 2)):
        t0 = time.perf_counter()
        expert.generate_batch(reqs)
        collab_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            expert.model.generate(input_ids=ids, attention_mask=mask, **raw_kw)
        raw_t.append(time.perf_counter() - t0)
    return {"collab_s": statistics.median(collab_t), "raw_s": statistics.median(raw_t), "ratio": statistics.median(raw_t) / statistics.median(collab_t)}


_LOAD_CODE = """
import time
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from collab.experts import Expert
t1 = time.perf_counter()
Expert.load('zoo:smollm2-135m-instruct')
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def _load_once(env: dict) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _LOAD_CODE], env=env, capture_output=True, text=True, check=True)
    imports, load = out.stdout.split()[-2:]
    return float(imports), float(load)


def bench_load() -> dict:
    """Load time in a fresh process with an empty cache (de-quantise), then with it filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, COLLAB_CACHE=cache)
        _, first = _load_once(env)
        runs = [_load_once(env) for _ in range(3)]
    return {
        "first_load_s": first,
        "cached_load_s": statistics.median(r[1] for r in runs),
        "imports_s": statistics.median(r[0] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--parts", default="single,batch,raw", help="comma-separated subset of single,batch,raw (the load part follows --skip-load)")
    args = ap.parse_args()

    import torch

    from collab.experts import Expert

    expert = Expert.load("zoo:smollm2-135m-instruct")
    results = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}"}
    parts = set(args.parts.split(","))
    if "single" in parts:
        results["single"] = s = bench_single(expert, args.reps, args.max_tokens)
        print(f"Expert.generate {s['collab_tokens_per_s']:.1f} tok/s vs raw model.generate {s['raw_tokens_per_s']:.1f} tok/s: ratio {s['ratio']:.3f} (target >= 0.95)")
    if "batch" in parts:
        results["batch"] = b = bench_batch(expert, args.reps, args.max_tokens)
        print(f"8 prompts: sequential {b['sequential_s']:.2f} s, batched {b['batched_s']:.2f} s: speed-up {b['speedup']:.2f}x (target >= 4x); identical outputs {b['identical_outputs']}")
    if "raw" in parts:
        results["batch_raw"] = br = bench_batch_raw(expert, args.reps, args.max_tokens)
        print(f"8 prompts in one batch: generate_batch {br['collab_s']:.2f} s vs raw model.generate {br['raw_s']:.2f} s: ratio {br['ratio']:.3f} (target >= 0.95)")
    if not args.skip_load:
        results["load"] = ld = bench_load()
        print(f"load zoo:smollm2-135m-instruct in a fresh process: first (de-quantise) {ld['first_load_s']:.1f} s, cached {ld['cached_load_s']:.2f} s (target <= 3 s); importing torch+transformers before it {ld['imports_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
