"""A client that goes away stops its generation: streamed or not, alone or in a batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from collab.server import CollabServer, ServeOptions, create_app
from tests.server.helpers import Running, metric
from tests.tiny import make_tiny_model

LONG = {"model": "slow", "messages": [{"role": "user", "content": "Count from 1 to 30."}], "max_tokens": 200}


class SlowCounter:
    """Wraps an expert's forward: counts the passes and makes each take ``delay`` seconds."""

    def __init__(self, expert: Any, delay: float) -> None:
        self.calls = 0
        self.real = expert.forward
        self.delay = delay
        expert.forward = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return self.real(*args, **kw)


@pytest.fixture
def slow(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Running, SlowCounter]]:
    from collab.experts import Expert

    from collab.decode import generate
    from collab.system import GenerationRequest

    # EOS is a token the model does not write on this prompt within 200 tokens, so only a cancel stops it
    expert = Expert.load(make_tiny_model(tmp_path / "m", seed=0), name="slow")
    expert.eos_token_ids = []
    written: set[int] = set()

    def record(logits: Any, loop: Any) -> Any:
        chosen = logits.argmax(-1)
        written.update(chosen.tolist())
        return chosen

    generate(expert, GenerationRequest(messages=LONG["messages"], max_tokens=200), record)
    expert.eos_token_ids = [next(t for t in expert.tokenizer.all_special_ids if t not in written)]
    counter = SlowCounter(expert, 0.01)
    from routers.baselines import constant_router
    from routers.system import RoutedSystem

    wait = getattr(request, "param", 1)
    routed = RoutedSystem("auto", constant_router(["slow"], [0.9]), {"slow": expert})
    server = CollabServer.from_systems({"slow": expert, "auto": routed}, ServeOptions(max_wait_ms=wait))
    server.load()
    with Running(create_app(server)) as run:
        yield run, counter
    server.close()


def _settles(counter: SlowCounter) -> int:
    """The pass count once it stops growing (or after 5 s)."""
    last, deadline = -1, time.time() + 5
    while counter.calls != last and time.time() < deadline:
        last = counter.calls
        time.sleep(0.3)
    return counter.calls


def test_uncancelled_generation_runs_to_max_tokens(slow: tuple[Running, SlowCounter]) -> None:
    run, counter = slow
    r = httpx.post(run.url + "/chat/completions", json=LONG, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 200 and r["choices"][0]["finish_reason"] == "length"
    assert counter.calls == 200  # one prefill, 199 steps


@pytest.mark.parametrize("model", ["slow", "auto"])
def test_closing_a_stream_stops_its_generation(slow: tuple[Running, SlowCounter], model: str) -> None:
    run, counter = slow
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", run.url + "/chat/completions", json={**LONG, "stream": True, "model": model}) as resp:
            assert resp.status_code == 200
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 5:
                    break
    seen = _settles(counter)
    assert seen < 60, f"generation went on after the client left ({seen} passes)"
    # the server is still fine
    r = httpx.post(run.url + "/chat/completions", json={**LONG, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200


@pytest.mark.parametrize("model", ["slow", "auto"])  # an expert, and a router over it (the cancel reaches through)
def test_a_non_streaming_client_that_gives_up_stops_its_generation(slow: tuple[Running, SlowCounter], model: str) -> None:
    run, counter = slow
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(run.url + "/chat/completions", json={**LONG, "model": model}, timeout=0.5)
    seen = _settles(counter)
    assert seen < 150, f"generation went on after the client left ({seen} passes)"


@pytest.mark.parametrize("slow", [500], indirect=True)  # both requests in one batch
def test_one_client_leaving_a_batch_leaves_the_others_whole(slow: tuple[Running, SlowCounter]) -> None:
    run, counter = slow
    out: dict[str, Any] = {}

    def stay() -> None:
        out["r"] = httpx.post(run.url + "/chat/completions", json={**LONG, "max_tokens": 40}, timeout=60).json()

    t = threading.Thread(target=stay)
    t.start()
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", run.url + "/chat/completions", json={**LONG, "stream": True}) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 3:
                    break
    t.join(60)
    # one batch of two
    assert metric(run.base, "collab_batch_size_count", expert="slow") == 1
    assert metric(run.base, "collab_batch_size_bucket", expert="slow", le="1") == 0
    alone = httpx.post(run.url + "/chat/completions", json={**LONG, "max_tokens": 40}, timeout=60).json()
    assert out["r"]["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert out["r"]["usage"]["completion_tokens"] == 40
