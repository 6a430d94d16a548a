"""Load benchmark for `collab serve` on the zoo's SmolLM2-135M-Instruct, on loopback.

Starts `collab serve` in a subprocess on a free 127.0.0.1 port, loads the same
expert in this process for the direct baseline, and measures in one run (the
machine is shared, so only ratios measured side by side mean much):

  1. p50 server overhead: a non-streamed 32-token answer through the server vs
     `System.generate` on the same expert in-process (target <= 5 %);
  2. time to the first streamed token vs a one-token `System.generate` (target <= 1.2x);
  3. throughput (completion tokens/s) of 8 concurrent clients vs one client at a
     time (target >= 3x);
  4. 32 concurrent clients x 10 requests: zero errors, latency p50/p95.

Every loop is bounded in count and in time (``--deadline`` seconds per phase);
the server is stopped at the end, whatever happens.

Usage: python bench/serve.py [--reps 15] [--max-batch 8] [--no-continuous] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "zoo:smollm2-135m-instruct"
NAME = "smollm2-135m-instruct"
#: Prompts whose greedy answers run past 32 tokens, so every request decodes the same length.
LONG = [
    "Write a short story about a robot who learns to paint.",
    "List ten fruits and describe the colour of each one.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give five tips for learning a new language, with an example for each.",
    "Describe the water cycle in detail.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Server:
    def __init__(self, max_batch: int, max_wait_ms: float, continuous: bool = True) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "collab.cli", "serve", MODEL, "--port", str(self.port), "--max-batch", str(max_batch),
               "--max-wait-ms", str(max_wait_ms), "--max-queue", "256", "--log-level", "warning",
               "--continuous" if continuous else "--no-continuous"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"collab serve exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("collab serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def chat(client: Any, prompt: str, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
    r.raise_for_status()
    return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])


def first_token(client: Any, prompt: str) -> float:
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "stream": True}
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - t0
                break
        for _ in lines:  # drain, so the stream ends as a client's would
            pass
    return ttft


def overhead(expert: Any, client: Any, reps: int) -> dict[str, Any]:
    from collab.system import GenerationRequest

    prompt = LONG[0]
    req = GenerationRequest.chat(prompt, max_tokens=32)
    expert.generate(req), chat(client, prompt, 32)  # warm-up both
    direct, served, tokens = [], [], set()
    for _ in range(reps):  # alternate, so machine noise hits both alike
        t0 = time.perf_counter()
        c = expert.generate(req)
        direct.append(time.perf_counter() - t0)
        s, n = chat(client, prompt, 32)
        served.append(s)
        tokens.update({c.usage.completion_tokens, n})
    return {
        "direct_p50_s": statistics.median(direct),
        "server_p50_s": statistics.median(served),
        "overhead": statistics.median(served) / statistics.median(direct) - 1,
        # each server call against the direct call just before it: robust to the machine's load drifting
        "overhead_paired": statistics.median(s / d for s, d in zip(served, direct)) - 1,
        "tokens": sorted(tokens),
    }


def ttft(expert: Any, client: Any, reps: int) -> dict[str, Any]:
    from collab.system import GenerationRequest

    prompt = LONG[1]
    one = GenerationRequest.chat(prompt, max_tokens=1)
    expert.generate(one), first_token(client, prompt)
    direct, served = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        expert.generate(one)
        direct.append(time.perf_counter() - t0)
        served.append(first_token(client, prompt))
    return {"one_token_generate_p50_s": statistics.median(direct), "first_streamed_token_p50_s": statistics.median(served),
            "ratio": statistics.median(served) / statistics.median(direct),
            "ratio_paired": statistics.median(s / d for s, d in zip(served, direct))}


def run_clients(base: str, clients: int, per_client: int, max_tokens: int, deadline: float) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` requests one after another."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.time() + deadline

    def one(k: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as c:
            for i in range(per_client):
                if time.time() > stop_at:
                    with lock:
                        errors.append("deadline")
                    return
                try:
                    s, n = chat(c, LONG[(k + i) % len(LONG)], max_tokens)
                except Exception as e:  # noqa: BLE001 - counted
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append(s)
                    tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients, "requests": clients * per_client, "ok": len(latencies), "errors": len(errors), "first_errors": errors[:3],
        "wall_s": wall, "tokens_per_s": tokens[0] / wall, "requests_per_s": len(latencies) / wall,
        "latency_p50_s": pct(latencies, 0.5) if latencies else None, "latency_p95_s": pct(latencies, 0.95) if latencies else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--no-continuous", action="store_true", help="static batching: a batch runs until its last row ends")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds each load phase may take at most")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import httpx
    import torch

    from collab.experts import Expert

    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg(), "continuous": not args.no_continuous}
    server = Server(args.max_batch, args.max_wait_ms, not args.no_continuous)
    try:
        expert = Expert.load(MODEL)
        server.wait_ready()
        with httpx.Client(base_url=server.base, timeout=300) as client:
            out["overhead_32_tokens"] = o = overhead(expert, client, args.reps)
            print(f"1. 32-token answer p50: direct {o['direct_p50_s']:.3f} s, server {o['server_p50_s']:.3f} s, overhead {100 * o['overhead']:+.1f} % (paired {100 * o['overhead_paired']:+.1f} %; target <= 5 %)", flush=True)
            out["first_token"] = t = ttft(expert, client, args.reps)
            print(f"2. first streamed token p50 {t['first_streamed_token_p50_s']:.3f} s vs one-token generate {t['one_token_generate_p50_s']:.3f} s: {t['ratio']:.2f}x (paired {t['ratio_paired']:.2f}x; target <= 1.2x)", flush=True)
        del expert
        one = run_clients(server.base, 1, 8, 32, args.deadline)
        eight = run_clients(server.base, 8, 4, 32, args.deadline)
        out["one_client"], out["eight_clients"] = one, eight
        out["throughput_ratio"] = eight["tokens_per_s"] / one["tokens_per_s"]
        print(f"3. throughput: 1 client {one['tokens_per_s']:.1f} tok/s, 8 clients {eight['tokens_per_s']:.1f} tok/s: {out['throughput_ratio']:.2f}x (target >= 3x); errors {one['errors'] + eight['errors']}", flush=True)
        load = run_clients(server.base, 32, 10, 32, args.deadline)
        out["load_32x10"] = load
        print(f"4. 32 clients x 10 requests: {load['ok']} ok, {load['errors']} errors in {load['wall_s']:.1f} s "
              f"({load['requests_per_s']:.2f} req/s, {load['tokens_per_s']:.1f} tok/s), latency p50 {load['latency_p50_s']:.2f} s, p95 {load['latency_p95_s']:.2f} s")
        m = httpx.get(server.base + "/metrics").text
        out["batch_size_lines"] = [line for line in m.splitlines() if line.startswith("collab_batch_size_")]
    finally:
        server.stop()
    out["load_average_after"] = os.getloadavg()
    print(f"load average before {out['load_average_before']}, after {out['load_average_after']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
