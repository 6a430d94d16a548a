"""collab's Expert on a CUDA device: correctness against the CPU and batching throughput.

No weights need to travel: each model is built from a local directory holding
only its ``config.json`` and tokenizer files (e.g. the de-quantised zoo cache
``~/.cache/collab/gguf/zoo-smollm2-135m-instruct-*``), with seeded random
weights, so the architecture, vocabulary and shapes are the real ones while
the outputs are meaningless. It checks, in float32 with TF32 off:

  1. log-likelihoods on CUDA equal the CPU's (max abs diff), packed or not,
  2. greedy ``generate`` on CUDA equals the CPU's, ``stream`` equals
     ``generate`` and ``generate_batch`` equals one-at-a-time ``generate``,
  3. ``forward`` gives logits, hidden states and a KV cache on the device,

then measures in bfloat16 on CUDA: generation of 32 prompts one at a time vs
in batches of 8 and 32 (new tokens per second), the evals runner on 64
``skill:mixed`` questions with ``batch_size`` 1 vs 32, and multiple-choice
scoring per (context, choice) pair vs packed batches.

Usage: python bench/gpu.py --model-dir DIR [--model-dir DIR ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.prompts import PROMPTS  # noqa: E402

QUESTIONS = [
    ("Question: Which gas do plants take in for photosynthesis?\nAnswer:", [" oxygen", " carbon dioxide", " nitrogen", " helium"]),
    ("Question: What force pulls objects toward the Earth?\nAnswer:", [" magnetism", " friction", " gravity", " tension"]),
    ("Question: Which of these is a mammal?\nAnswer:", [" a shark", " a whale", " a trout", " a frog"]),
    ("Question: What is the boiling point of water at sea level?\nAnswer:", [" 50 degrees Celsius", " 100 degrees Celsius", " 0 degrees Celsius", " 212 degrees Celsius"]),
]


def random_model_dir(src: Path, dst: Path, seed: int = 0) -> Path:
    """A copy of ``src``'s config and tokenizer with seeded random weights (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(src))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(dst), safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, dst / f.name)
    return dst


def timed(fn):  # noqa: ANN001, ANN201
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def check_model(src: Path, work: Path, device: str = "cuda", n_gen: int = 32, gen_tokens: int = 128) -> dict:
    import torch

    from collab.experts import Expert
    from collab.system import GenerationRequest, collect_stream
    from evals.benchmarks import benchmark_names, register_benchmark, skills
    from evals.runner import evaluate

    if "skill:mixed" not in benchmark_names():  # collab not pip-installed here: no entry points
        register_benchmark("skill:mixed", skills.mixed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model_dir = random_model_dir(src, work / src.name)
    cpu = Expert.load(model_dir, device="cpu", dtype="float32")
    gpu = Expert.load(model_dir, device=device, dtype="float32")
    out: dict = {"model": src.name, "arch": cpu.model.config.architectures, "vocab": cpu.model.config.vocab_size,
                 "device": torch.cuda.get_device_name(0) if device == "cuda" else device}

    # 1. scoring: CUDA vs CPU, packed vs one pair per row
    pairs = [(c, x) for c, xs in QUESTIONS for x in xs]
    ll_cpu = cpu.loglikelihood_batch(pairs)
    ll_gpu = gpu.loglikelihood_batch(pairs)
    ll_gpu_sep = gpu.loglikelihood_batch(pairs, batch_size=1, share_context=False)
    out["ll_max_abs_diff_device_vs_cpu"] = max(abs(a[0] - b[0]) for a, b in zip(ll_cpu, ll_gpu))
    out["ll_max_abs_diff_packed_vs_separate"] = max(abs(a[0] - b[0]) for a, b in zip(ll_gpu, ll_gpu_sep))

    # 2. generation: CUDA vs CPU, stream vs generate, batch vs single
    reqs = [GenerationRequest.chat(p, max_tokens=24) for p in PROMPTS]
    g_cpu = [cpu.generate(r).text for r in reqs[:4]]
    g_gpu = [gpu.generate(r).text for r in reqs[:4]]
    out["greedy_device_equals_cpu"] = sum(a == b for a, b in zip(g_cpu, g_gpu)) / len(g_cpu)
    out["stream_equals_generate"] = all(collect_stream(gpu.stream(r)).text == t for r, t in zip(reqs[:4], g_gpu))
    batch = [c.text for c in gpu.generate_batch(reqs)]
    single = [gpu.generate(r).text for r in reqs]
    out["batch_equals_single"] = sum(a == b for a, b in zip(batch, single)) / len(single)

    # 3. forward: logits, hidden states, KV cache on the device
    ids = torch.tensor([gpu.encode(reqs[0])])
    fwd = gpu.forward(ids, output_hidden_states=True)
    on_device = fwd.logits.device.type == device and fwd.hidden_states[-1].device.type == device
    out["forward_on_device"] = bool(on_device and fwd.cache is not None)
    del cpu, gpu

    # throughput in bfloat16
    fast = Expert.load(model_dir, device=device, dtype="bfloat16", batch_size=32)
    gen_reqs = [GenerationRequest.chat(PROMPTS[i % len(PROMPTS)] + f" (variant {i})", max_tokens=gen_tokens) for i in range(n_gen)]
    fast.generate(gen_reqs[0])  # warm-up
    rates = {}
    for bs in (1, 8, 32):
        fast.batch_size = bs
        comps, dt = timed(lambda: [fast.generate(r) for r in gen_reqs] if bs == 1 else fast.generate_batch(gen_reqs))
        toks = sum(c.usage.completion_tokens for c in comps)
        rates[bs] = toks / dt
        out[f"generate_tokens_per_s_batch{bs}"] = round(rates[bs], 1)
        out[f"generate_tokens_batch{bs}"] = toks
    out["generate_speedup_32_vs_1"] = round(rates[32] / rates[1], 2)
    out["generate_speedup_8_vs_1"] = round(rates[8] / rates[1], 2)

    runner = {}
    for bs in (1, 32):
        res, dt = timed(lambda: evaluate(fast, "skill:mixed", limit=2 * n_gen, batch_size=bs, progress=False))
        runner[bs] = res.n / dt
        out[f"runner_skill_mixed_examples_per_s_batch{bs}"] = round(runner[bs], 2)
    out["runner_speedup_32_vs_1"] = round(runner[32] / runner[1], 2)

    many = pairs * 16
    fast.loglikelihood_batch(pairs)  # warm-up
    _, t_sep = timed(lambda: fast.loglikelihood_batch(many, batch_size=1, share_context=False))
    _, t_pack = timed(lambda: fast.loglikelihood_batch(many, batch_size=16))
    out["mc_pairs"] = len(many)
    out["mc_pairs_per_s_separate"] = round(len(many) / t_sep, 1)
    out["mc_pairs_per_s_packed_batch16"] = round(len(many) / t_pack, 1)
    out["mc_speedup"] = round(t_sep / t_pack, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", action="append", required=True, help="a directory with config.json and tokenizer files")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a quick dry run of the script")
    ap.add_argument("--n", type=int, default=32, help="prompts in the generation comparison")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as work:
        for d in args.model_dir:
            r = check_model(Path(d), Path(work), args.device, args.n, args.tokens)
            results.append(r)
            print(json.dumps(r, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
