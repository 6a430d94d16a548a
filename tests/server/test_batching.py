"""Dynamic batching: concurrent requests to one local expert decode together, give
the answers they would alone, respect --max-batch and --max-queue, and routed
requests join the batches of the expert they are routed to."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from collab.server import CollabServer, ServeOptions, create_app
from collab.system import GenerationRequest
from tests.server.helpers import Running, metric, write_spec

PROMPTS = ["What is 2 + 2?", "The capital of France is", "Reverse the list [1, 2, 3].", "Count from 1 to 30, separated by commas.", "Hello there!"]


def body(prompt: str, model: str = "tiny", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, **kw}


def together(url: str, bodies: list[dict[str, Any]], stagger: float = 0.0) -> list[httpx.Response]:
    """POST every body at once (from threads); the responses in order."""
    out: list[Any] = [None] * len(bodies)

    def one(i: int) -> None:
        out[i] = httpx.post(url + "/chat/completions", json=bodies[i], timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(120)
    return out


@pytest.fixture
def serve(tiny_model_dir: Path) -> Iterator[Callable[..., Running]]:
    """serve(options, systems=None): run a server over a fresh tiny expert (or the given systems)."""
    from collab.experts import Expert

    stack: list[tuple[CollabServer, Running]] = []

    def start(options: ServeOptions, systems: dict[str, Any] | None = None, spec: Any = None) -> Running:
        if spec is not None:
            server = CollabServer.from_spec(spec, options)
        else:
            server = CollabServer.from_systems(systems or {"tiny": Expert.load(tiny_model_dir, name="tiny")}, options)
        server.load()
        run = Running(create_app(server)).__enter__()
        stack.append((server, run))
        return run

    yield start
    for server, run in stack:
        run.__exit__(None, None, None)
        server.close()


def test_concurrent_requests_share_a_batch_and_answer_as_alone(serve: Callable[..., Running], tiny_expert: Any) -> None:
    run = serve(ServeOptions(max_batch=8, max_wait_ms=500))
    bodies = [body(p, max_tokens=8 + 3 * i) for i, p in enumerate(PROMPTS)]
    results = together(run.url, bodies)
    assert metric(run.base, "collab_batch_size_count", expert="tiny") == 1  # all five in one batch
    assert metric(run.base, "collab_batch_size_sum", expert="tiny") == len(PROMPTS)
    for b, r in zip(bodies, results):
        alone = tiny_expert.generate(GenerationRequest(messages=b["messages"], max_tokens=b["max_tokens"]))
        got = r.json()
        assert got["choices"][0]["message"]["content"] == alone.text
        assert got["usage"]["completion_tokens"] == alone.usage.completion_tokens
        assert got["usage"]["prompt_tokens"] == alone.usage.prompt_tokens
    assert metric(run.base, "collab_queue_wait_seconds_count", expert="tiny") == len(PROMPTS)


def test_a_seeded_sample_is_the_same_in_a_batch_as_alone(serve: Callable[..., Running], tiny_expert: Any) -> None:
    run = serve(ServeOptions(max_batch=8, max_wait_ms=500))
    sampled = [body(p, temperature=1.3, seed=11 + i) for i, p in enumerate(PROMPTS[:3])]
    greedy = [body(p) for p in PROMPTS[3:]]
    results = together(run.url, sampled + greedy)
    assert metric(run.base, "collab_batch_size_count", expert="tiny") == 1
    for b, r in zip(sampled, results):
        alone = tiny_expert.generate(GenerationRequest(messages=b["messages"], max_tokens=12, temperature=1.3, seed=b["seed"]))
        assert r.json()["choices"][0]["message"]["content"] == alone.text


def slow_expert(model_dir: Path, delay: float) -> Any:
    """A tiny expert whose every forward pass takes ``delay`` seconds more."""
    from collab.experts import Expert

    expert = Expert.load(model_dir, name="tiny")
    real = expert.forward

    def slow_forward(*a: Any, **kw: Any) -> Any:
        time.sleep(delay)
        return real(*a, **kw)

    expert.forward = slow_forward  # type: ignore[method-assign]
    return expert


def test_max_batch_caps_each_batch(serve: Callable[..., Running], tiny_model_dir: Path) -> None:
    # while the first batch decodes (slowly), the other requests pile up in the queue
    run = serve(ServeOptions(max_batch=2, max_wait_ms=300), {"tiny": slow_expert(tiny_model_dir, 0.03)})
    results = together(run.url, [body(p) for p in PROMPTS])
    assert all(r.status_code == 200 for r in results)
    batches = metric(run.base, "collab_batch_size_count", expert="tiny")
    assert metric(run.base, "collab_batch_size_bucket", expert="tiny", le="2") == batches >= 3
    assert metric(run.base, "collab_batch_size_sum", expert="tiny") == len(PROMPTS)


def test_a_full_queue_answers_429_and_recovers(serve: Callable[..., Running], tiny_model_dir: Path) -> None:
    run = serve(ServeOptions(max_batch=1, max_wait_ms=0, max_queue=1), {"tiny": slow_expert(tiny_model_dir, 0.02)})
    long = body(PROMPTS[3], max_tokens=60)
    out: list[Any] = []
    first = threading.Thread(target=lambda: out.append(httpx.post(run.url + "/chat/completions", json=long, timeout=60)))
    first.start()
    deadline = time.time() + 10  # wait until the first request is decoding, so the queue is empty
    while metric(run.base, "collab_batch_size_count", expert="tiny") < 1 and time.time() < deadline:
        time.sleep(0.02)
    second = threading.Thread(target=lambda: out.append(httpx.post(run.url + "/chat/completions", json=long, timeout=60)))
    second.start()
    while metric(run.base, "collab_queue_depth", expert="tiny") < 1 and time.time() < deadline:
        time.sleep(0.02)
    third = httpx.post(run.url + "/chat/completions", json=long, timeout=60)
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "queue_full" and "--max-queue 1" in third.json()["error"]["message"]
    first.join(60)
    second.join(60)
    assert [r.status_code for r in out] == [200, 200]
    assert httpx.post(run.url + "/chat/completions", json=body("hi"), timeout=60).status_code == 200
    assert metric(run.base, "collab_request_errors_total", status="429") == 1


def test_generation_runs_off_the_event_loop(serve: Callable[..., Running], tiny_model_dir: Path) -> None:
    run = serve(ServeOptions(), {"tiny": slow_expert(tiny_model_dir, 0.05)})
    t = threading.Thread(target=lambda: httpx.post(run.url + "/chat/completions", json=body("Count from 1 to 30.", max_tokens=40), timeout=60))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert httpx.get(run.base + "/health", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 0.5  # a 2 s generation is running meanwhile
    t.join(60)


def test_routed_requests_join_the_experts_batches(serve: Callable[..., Running], tmp_path: Path, tiny_model_dir: Path) -> None:
    from collab.spec import load_spec
    from routers.baselines import constant_router

    constant_router(["a", "b"], [0.9, 0.2]).save(tmp_path / "router")
    spec = load_spec(write_spec(tmp_path / "s.yaml", {"a": str(tiny_model_dir), "b": str(tiny_model_dir)}, "systems:\n  auto: {type: route, router: router, experts: [a, b]}\n"))
    run = serve(ServeOptions(max_batch=8, max_wait_ms=500), spec=spec)
    models = httpx.get(run.url + "/models").json()["data"]
    assert [(m["id"], m["collab"]["type"]) for m in models] == [("a", "expert"), ("b", "expert"), ("auto", "route")]
    results = together(run.url, [body(PROMPTS[0], "auto"), body(PROMPTS[1], "a"), body(PROMPTS[2], "auto")])
    assert metric(run.base, "collab_batch_size_count", expert="a") == 1  # routed and direct requests, one batch
    assert metric(run.base, "collab_batch_size_sum", expert="a") == 3
    routed = results[0].json()
    assert routed["collab"]["routed_to"] == "a" and routed["collab"]["scores"] == {"a": 0.9, "b": 0.2}
    assert routed["collab"]["expert_trace"]["expert"] == "a"
    assert routed["choices"][0]["message"]["content"] == httpx.post(run.url + "/chat/completions", json=body(PROMPTS[0], "a")).json()["choices"][0]["message"]["content"]
    assert metric(run.base, "collab_routed_total", system="auto", expert="a") == 2
    streamed = httpx.post(run.url + "/chat/completions", json=body(PROMPTS[0], "auto", stream=True)).text
    assert '"routed_to":"a"' in streamed and streamed.endswith("data: [DONE]\n\n")


def test_metrics_are_valid_prometheus_text(serve: Callable[..., Running]) -> None:
    run = serve(ServeOptions())
    httpx.post(run.url + "/chat/completions", json=body("hi"), timeout=60)
    httpx.post(run.url + "/chat/completions", json=body("hi", model="nope"), timeout=60)
    r = httpx.get(run.base + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+$|^[a-z_]+\{.*le="\+Inf".*\} [0-9]+$')
    for line in r.text.strip().splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.match(line), line
    assert metric(run.base, "collab_requests_total", endpoint="/v1/chat/completions", model="tiny", status="200") == 1
    assert metric(run.base, "collab_requests_total", endpoint="/v1/chat/completions", model="", status="404") == 1
    assert metric(run.base, "collab_tokens_total", model="tiny", kind="completion") >= 1
    assert metric(run.base, "collab_request_latency_seconds_count", model="tiny") == 1
    assert metric(run.base, "collab_requests_in_flight") == 0


def test_clients_answered_by_a_batch_rejoin_the_next_one(serve: Callable[..., Running], tiny_model_dir: Path) -> None:
    """A request that arrived while a batch ran waits (up to --max-wait-ms) after that batch
    for the clients it answered, so closed-loop clients do not split into groups taking turns
    (static batching, ``--no-continuous``)."""
    run = serve(ServeOptions(max_batch=8, max_wait_ms=400, continuous=False), {"tiny": slow_expert(tiny_model_dir, 0.02)})
    x_done = threading.Event()

    def client_x() -> None:  # two requests, one right after the other
        httpx.post(run.url + "/chat/completions", json=body(PROMPTS[0], max_tokens=30), timeout=60)
        x_done.set()
        httpx.post(run.url + "/chat/completions", json=body(PROMPTS[1], max_tokens=5), timeout=60)

    x = threading.Thread(target=client_x)
    x.start()
    deadline = time.time() + 10
    while metric(run.base, "collab_batch_size_count", expert="tiny") < 1 and time.time() < deadline:
        time.sleep(0.01)
    y = httpx.post(run.url + "/chat/completions", json=body(PROMPTS[2], max_tokens=5), timeout=60)  # arrives while X's batch runs
    x.join(60)
    assert y.status_code == 200 and x_done.is_set()
    # X's first request alone, then Y's and X's second together
    assert metric(run.base, "collab_batch_size_count", expert="tiny") == 2
    assert metric(run.base, "collab_batch_size_sum", expert="tiny") == 3


def test_a_request_joins_the_running_batch_and_leaves_it_first(serve: Callable[..., Running], tiny_model_dir: Path) -> None:
    """Continuous batching: a short request that arrives while a long one decodes joins its
    batch between two steps and is answered before the long one ends, with the text it gets alone."""
    run = serve(ServeOptions(max_batch=8, max_wait_ms=0), {"tiny": slow_expert(tiny_model_dir, 0.03)})
    long_body = body(PROMPTS[0], max_tokens=40)
    long_body["stop"] = ["\u2603"]  # never generated: the answer runs to max_tokens
    finished: dict[str, float] = {}
    answers: dict[str, Any] = {}

    def ask(key: str, payload: dict[str, Any]) -> None:
        answers[key] = httpx.post(run.url + "/chat/completions", json=payload, timeout=60)
        finished[key] = time.monotonic()

    x = threading.Thread(target=ask, args=("long", long_body))
    x.start()
    deadline = time.time() + 10
    while metric(run.base, "collab_batch_size_count", expert="tiny") < 1 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a few steps into the long answer
    ask("short", body(PROMPTS[2], max_tokens=3))
    x.join(60)
    assert answers["long"].status_code == 200 and answers["short"].status_code == 200
    assert answers["long"].json()["usage"]["completion_tokens"] == 40 or answers["long"].json()["choices"][0]["finish_reason"] == "stop"
    assert finished["short"] < finished["long"]  # it did not wait for the long answer's batch to end
    # one batch: started with the long request, joined by the short one (2 rows running then)
    assert metric(run.base, "collab_batch_size_count", expert="tiny") == 2
    assert metric(run.base, "collab_batch_size_sum", expert="tiny") == 3
    for key, prompt, n in (("short", PROMPTS[2], 3), ("long", PROMPTS[0], 40)):
        payload = body(prompt, max_tokens=n)
        if key == "long":
            payload["stop"] = ["\u2603"]
        alone = httpx.post(run.url + "/chat/completions", json=payload, timeout=60).json()
        assert answers[key].json()["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
