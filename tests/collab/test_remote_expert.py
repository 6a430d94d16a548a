from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi import Request

from collab.errors import RemoteError
from collab.remote import RemoteExpert
from collab.system import GenerationRequest
from tests.contract import SystemContract
from tests.server.helpers import Running


@pytest.fixture(scope="module")
def peer(tiny_expert: Any) -> Iterator[Running]:
    """collab serve's app, in-process, serving the tiny expert as 'tiny-remote'."""
    from collab.server import CollabServer, ServeOptions, create_app

    server = CollabServer.from_systems({"tiny-remote": tiny_expert}, ServeOptions(api_key="sekret"))
    server.load()
    with Running(create_app(server)) as p:
        yield p
    server.close()


@pytest.fixture(scope="module")
def remote(peer: Running) -> Iterator[RemoteExpert]:
    r = RemoteExpert(peer.url, "tiny-remote", api_key="sekret", name="far")
    yield r
    r.close()


class TestRemoteExpertContract(SystemContract):
    @pytest.fixture
    def system(self, remote: RemoteExpert) -> Any:
        return remote


def test_remote_equals_local(remote: RemoteExpert, tiny_expert: Any) -> None:
    for req in (GenerationRequest.chat("What is 2 + 2?", max_tokens=10), GenerationRequest(prompt="Hello there", max_tokens=10)):
        far, near = remote.generate(req), tiny_expert.generate(req)
        assert far.text == near.text
        assert far.usage == near.usage
        assert far.trace["type"] == "remote" and far.trace["remote"]["expert"] == "tiny"


def test_remote_loglikelihood_matches_local(remote: RemoteExpert, tiny_expert: Any) -> None:
    ctx, cont = "The capital of France is", " Paris"
    assert remote.loglikelihood(ctx, cont) == pytest.approx(tiny_expert.loglikelihood(ctx, cont), abs=1e-3)


def test_bad_api_key_is_a_clear_error(peer: Running) -> None:
    r = RemoteExpert(peer.url, "tiny-remote", api_key="wrong")
    with pytest.raises(RemoteError, match="HTTP 401: wrong API key"):
        r.generate(GenerationRequest.chat("hi", max_tokens=2))
    with pytest.raises(RemoteError, match="HTTP 401"):
        list(r.stream(GenerationRequest.chat("hi", max_tokens=2)))


def test_unknown_model_is_a_clear_error(peer: Running) -> None:
    r = RemoteExpert(peer.url, "nope", api_key="sekret")
    with pytest.raises(RemoteError, match="HTTP 404: model 'nope' not found"):
        r.generate(GenerationRequest.chat("hi", max_tokens=2))


def test_unreachable_endpoint() -> None:
    r = RemoteExpert("http://127.0.0.1:9/v1", "m", timeout=2)
    with pytest.raises(RemoteError, match="remote expert 'm' at http://127.0.0.1:9/v1/chat/completions"):
        r.generate(GenerationRequest.chat("hi", max_tokens=2))


def test_remote_expert_in_a_spec(peer: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collab.spec import load_spec

    monkeypatch.setenv("FAR_KEY", "sekret")
    p = tmp_path / "s.yaml"
    p.write_text(f"experts:\n  far: {{url: {peer.url}, model: tiny-remote, api_key: $FAR_KEY}}\n")
    far = load_spec(p).system("far")
    assert isinstance(far, RemoteExpert)
    assert far.generate(GenerationRequest.chat("hi", max_tokens=3)).usage.completion_tokens <= 3


def test_failed_endpoint_falls_back_as_the_spec_says(tmp_path: Path, tiny_model_dir: Path, tiny_expert: Any) -> None:
    from collab.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text(
        f"experts:\n  near: {{ref: {tiny_model_dir}}}\n"
        "  far: {url: 'http://127.0.0.1:9/v1', model: m, timeout: 2, fallback: near}\n"
    )
    far = load_spec(p).system("far")
    req = GenerationRequest.chat("What is 2 + 2?", max_tokens=6)
    c = far.generate(req)
    assert c.text == tiny_expert.generate(req).text
    assert c.trace["system"] == "far" and c.trace["fallback_from"] == "far" and c.trace["expert"] == "near"
    assert "127.0.0.1:9" in c.trace["fallback_error"]
    chunks = list(far.stream(req))
    assert "".join(ch.text for ch in chunks) == c.text and chunks[-1].trace["fallback_from"] == "far"
    assert far.loglikelihood("The capital of France is", " Paris") == pytest.approx(tiny_expert.loglikelihood("The capital of France is", " Paris"))


def test_a_live_endpoint_does_not_fall_back(peer: Running, tmp_path: Path, tiny_model_dir: Path) -> None:
    from collab.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text(f"experts:\n  near: {{ref: {tiny_model_dir}}}\n  far: {{url: {peer.url}, model: tiny-remote, api_key: sekret, fallback: near}}\n")
    c = load_spec(p).system("far").generate(GenerationRequest.chat("hi", max_tokens=3))
    assert c.trace["type"] == "remote" and "fallback_from" not in c.trace


@pytest.mark.parametrize(
    "experts, match",
    [
        ("  a: {ref: zoo:gemma3-270m, fallback: b}\n  b: {ref: zoo:gemma3-270m}", r"experts.a.fallback: only a remote expert"),
        ("  a: {url: 'http://x/v1', model: m, fallback: nobody}", r"experts.a.fallback: unknown system 'nobody'"),
        ("  a: {url: 'http://x/v1', model: m, fallback: b}\n  b: {url: 'http://y/v1', model: m, fallback: a}", r"fallbacks loop: a -> b -> a"),
    ],
)
def test_fallback_errors_name_the_key(tmp_path: Path, experts: str, match: str) -> None:
    from collab.errors import SpecError
    from collab.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text("experts:\n" + experts + "\n")
    with pytest.raises(SpecError, match=match):
        load_spec(p)


# ---------------------------------------------------------------- faults
class Faulty:
    """An OpenAI-style endpoint that misbehaves as each request's model name says;
    counts the calls per model."""

    def __init__(self) -> None:
        from collections import Counter

        self.calls: Counter[str] = Counter()
        self.healthy = False

    def app(self) -> Any:
        import asyncio
        import json

        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

        app = FastAPI()
        ok = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}

        def chunk(text: str, finish: str | None = None) -> str:
            return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}) + "\n\n"

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            mode = body["model"]
            self.calls[mode] += 1
            if self.healthy or (mode == "flaky" and self.calls[mode] > 2):
                if body.get("stream"):
                    return StreamingResponse(iter([chunk("fi"), chunk("ne", "stop"), "data: [DONE]\n\n"]), media_type="text/event-stream")
                return ok
            if mode == "hang":
                await asyncio.sleep(3)  # longer than the client waits; ends by itself
                return ok
            if mode == "garbage":
                return PlainTextResponse("<html>502 Bad Gateway</html>")
            if mode == "badjson":
                return {"choices": []}
            if mode == "refuse":
                return JSONResponse({"error": {"message": "max_tokens is too large", "type": "invalid_request_error", "param": "max_tokens", "code": None}}, 400)
            if mode in ("flaky", "down"):
                return JSONResponse({"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}, 503, headers={"Retry-After": "0"})
            if mode in ("drop", "truncated"):
                async def events() -> Any:
                    yield chunk("Hello")
                    yield chunk(" there")
                    await asyncio.sleep(0.05)
                    if mode == "drop":
                        raise ConnectionResetError("gone")  # uvicorn drops the connection mid-body

                return StreamingResponse(events(), media_type="text/event-stream")
            raise AssertionError(mode)

        return app


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[Faulty, Running]]:
    f = Faulty()
    with Running(f.app()) as run:
        yield f, run


def _remote(run: Running, mode: str, **kw: Any) -> RemoteExpert:
    kw.setdefault("backoff", 0.01)
    return RemoteExpert(run.url, mode, name=f"far-{mode}", **kw)


HI = GenerationRequest.chat("hi", max_tokens=4)


def test_a_hanging_endpoint_times_out_without_retrying(faulty: tuple[Faulty, Running]) -> None:
    import time

    f, run = faulty
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=r"remote expert 'far-hang' at .*/chat/completions: ReadTimeout"):
        _remote(run, "hang", timeout=0.5).generate(HI)
    assert time.monotonic() - t0 < 2.5 and f.calls["hang"] == 1


@pytest.mark.parametrize("mode, words", [("garbage", "not JSON: '<html>502 Bad Gateway</html>'"), ("badjson", "a malformed completion (IndexError")])
def test_garbage_is_a_remote_error(faulty: tuple[Faulty, Running], mode: str, words: str) -> None:
    with pytest.raises(RemoteError, match=re.escape(words)):
        _remote(faulty[1], mode).generate(HI)


def test_overloaded_endpoint_is_retried_with_back_off(faulty: tuple[Faulty, Running]) -> None:
    f, run = faulty
    c = _remote(run, "flaky", retries=2).generate(HI)
    assert c.text == "fine" and f.calls["flaky"] == 3
    f.calls["flaky"] = 0
    with pytest.raises(RemoteError, match=r"HTTP 503: overloaded \(after 2 attempts\)"):
        _remote(run, "flaky", retries=1).generate(HI)
    assert f.calls["flaky"] == 2


def test_a_refused_request_is_not_retried_and_does_not_fall_back(faulty: tuple[Faulty, Running], tiny_expert: Any) -> None:
    from collab.remote import FallbackSystem, RemoteRefused

    f, run = faulty
    far = _remote(run, "refuse", breaker_failures=1)
    with pytest.raises(RemoteRefused, match="HTTP 400: max_tokens is too large") as e:
        FallbackSystem(far, tiny_expert).generate(HI)
    assert e.value.status == 400 and f.calls["refuse"] == 1 and far.breaker.state == "closed"


@pytest.mark.parametrize("mode, words", [("drop", "the stream broke off: RemoteProtocolError"), ("truncated", "the stream ended before its answer did")])
def test_a_stream_that_breaks_off_is_a_remote_error_after_its_chunks(faulty: tuple[Faulty, Running], mode: str, words: str) -> None:
    got: list[str] = []
    with pytest.raises(RemoteError, match=re.escape(words)):
        for ch in _remote(faulty[1], mode).stream(HI):
            got.append(ch.text)
    assert "".join(got) == "Hello there"


def test_the_circuit_opens_after_repeated_failures_then_tries_again(faulty: tuple[Faulty, Running], tiny_expert: Any) -> None:
    import time

    from collab.remote import FallbackSystem

    f, run = faulty
    far = _remote(run, "down", retries=1, breaker_failures=2, breaker_cooldown=0.5)
    system = FallbackSystem(far, tiny_expert)
    for _ in range(2):
        c = system.generate(HI)
        assert c.trace["fallback_from"] == "far-down" and "HTTP 503: overloaded (after 2 attempts)" in c.trace["fallback_error"]
    assert f.calls["down"] == 4 and far.breaker.state == "open"
    c = system.generate(HI)  # answered by the fallback at once, without calling the endpoint
    assert f.calls["down"] == 4 and "circuit open after 2 consecutive failures" in c.trace["fallback_error"]
    assert c.text == tiny_expert.generate(HI).text
    chunks = list(system.stream(HI))
    assert "circuit open" in chunks[-1].trace["fallback_error"] and f.calls["down"] == 4
    time.sleep(0.6)
    assert far.breaker.state == "half-open"
    system.generate(HI)  # the trial call fails: open again
    assert f.calls["down"] == 6 and far.breaker.state == "open"
    time.sleep(0.6)
    f.healthy = True
    try:
        c = system.generate(HI)
    finally:
        f.healthy = False
    assert c.text == "fine" and "fallback_from" not in c.trace and far.breaker.state == "closed"


def test_spec_passes_retry_and_breaker_settings(tmp_path: Path) -> None:
    from collab.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text("experts:\n  far: {url: 'http://127.0.0.1:9/v1', model: m, retries: 0, backoff: 0.5, breaker_failures: 5, breaker_cooldown: 2}\n")
    far = load_spec(p).system("far")
    assert (far.retries, far.backoff, far.breaker.failures, far.breaker.cooldown) == (0, 0.5, 5, 2)
