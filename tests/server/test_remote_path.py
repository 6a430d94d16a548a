"""Past one machine: a router over a local expert and a remote one that is another
`collab serve` process on loopback. Killing the remote mid-run trips the circuit
breaker and the fallback answers, and the trace says so."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from collab.server import CollabServer, ServeOptions, create_app
from collab.system import GenerationRequest
from tests.server.helpers import Running, ServeProcess, write_spec


@pytest.fixture
def remote(tmp_path: Path, tiny_plain_model_dir: Path) -> Iterator[ServeProcess]:
    spec = write_spec(tmp_path / "inner.yaml", {"inner": str(tiny_plain_model_dir)})
    with ServeProcess(str(spec), "--api-key", "inner-key") as srv:
        yield srv.wait_ready()


@pytest.fixture
def outer(tmp_path: Path, tiny_model_dir: Path, remote: ServeProcess) -> Iterator[tuple[CollabServer, Running]]:
    from collab.spec import load_spec
    from routers.baselines import constant_router

    constant_router(["near", "far"], [0.2, 0.9]).save(tmp_path / "router")
    spec = tmp_path / "outer.yaml"
    spec.write_text(
        f"experts:\n  near: {{ref: {tiny_model_dir}}}\n"
        f"  far: {{url: '{remote.url}', model: inner, api_key: inner-key, timeout: 10, fallback: near}}\n"
        "systems:\n  auto: {type: route, router: router, experts: [near, far]}\n"
    )
    server = CollabServer.from_spec(load_spec(spec), ServeOptions(api_key="outer-key"))
    server.load()
    with Running(create_app(server)) as run:
        yield server, run
    server.close()


def test_a_router_answers_through_a_remote_collab_serve_and_falls_back_when_it_dies(
    outer: tuple[CollabServer, Running], remote: ServeProcess, tiny_expert: Any, tiny_plain_model_dir: Path
) -> None:
    from collab.experts import Expert

    server, run = outer
    client = openai.OpenAI(base_url=run.url, api_key="outer-key", max_retries=0, timeout=60)
    assert [m.model_extra["collab"]["type"] for m in client.models.list()] == ["expert", "remote", "route"]
    ask = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8}
    plain = Expert.load(tiny_plain_model_dir, name="inner").generate(GenerationRequest(messages=ask["messages"], max_tokens=8))

    r = client.chat.completions.create(**ask)
    t = r.model_extra["collab"]
    assert t["routed_to"] == "far" and t["expert_trace"]["type"] == "remote"
    assert t["expert_trace"]["remote"]["expert"] == "inner"  # the remote server's own trace, passed on
    assert r.choices[0].message.content == plain.text
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True) if c.choices)
    assert streamed == plain.text

    answers: list[Any] = []
    failures: list[BaseException] = []

    def keep_asking() -> None:  # bounded: 40 requests or 90 s
        deadline = time.time() + 90
        for _ in range(40):
            if time.time() > deadline:
                break
            try:
                answers.append(client.chat.completions.create(**ask))
            except Exception as e:  # noqa: BLE001 - collected and asserted on below
                failures.append(e)
            if sum("circuit open" in (a.model_extra["collab"]["expert_trace"].get("fallback_error") or "") for a in answers) >= 3:
                break

    worker = threading.Thread(target=keep_asking)
    worker.start()
    while len(answers) < 3 and worker.is_alive():
        time.sleep(0.01)
    remote.proc.send_signal(signal.SIGKILL)  # mid-run: requests are in flight
    worker.join(120)
    assert not failures, failures
    traces = [a.model_extra["collab"]["expert_trace"] for a in answers]
    before = [t for t in traces if "fallback_from" not in t]
    after = [t for t in traces if "fallback_from" in t]
    assert len(before) >= 3 and len(after) >= 4
    assert all(t["type"] == "remote" for t in before)
    near_text = tiny_expert.generate(GenerationRequest(messages=ask["messages"], max_tokens=8)).text
    for a, t in zip(answers, traces):
        if "fallback_from" in t:
            assert t["fallback_from"] == "far" and t["expert"] == "near"
            assert a.choices[0].message.content == near_text
    errors = [t["fallback_error"] for t in after]
    assert any("ConnectError" in e or "RemoteProtocolError" in e for e in errors), errors
    assert "circuit open after 3 consecutive failures" in errors[-1]
    # the fallback's requests went through the local expert's batcher
    assert server.metrics.batch_size.count(expert="near") >= len(after)
    far = server.models["far"].system.primary
    assert far.breaker.state == "open"
    # once open, the fallback answers at once: no connection attempts, no back-off
    t0 = time.monotonic()
    r = client.chat.completions.create(**ask)
    assert time.monotonic() - t0 < 2.0 and "circuit open" in r.model_extra["collab"]["expert_trace"]["fallback_error"]
    assert client.chat.completions.create(**{**ask, "model": "far"}).model_extra["collab"]["fallback_from"] == "far"


def test_a_remote_that_refuses_a_request_passes_the_status_on(outer: tuple[CollabServer, Running]) -> None:
    _, run = outer
    client = openai.OpenAI(base_url=run.url, api_key="outer-key", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:  # the inner model's context window is 256 tokens
        client.chat.completions.create(model="far", messages=[{"role": "user", "content": "word " * 300}], max_tokens=4)
    assert e.value.status_code == 413 and "remote expert 'far'" in e.value.body["message"] and "HTTP 413" in e.value.body["message"]


def test_remote_faults_reach_the_client_as_errors_and_the_server_keeps_serving(tiny_expert: Any) -> None:
    from collab.remote import RemoteExpert
    from tests.collab.test_remote_expert import Faulty

    faulty = Faulty()
    with Running(faulty.app()) as bad:
        systems = {m: RemoteExpert(bad.url, m, name=m, timeout=0.5, backoff=0.01) for m in ("drop", "hang", "garbage", "truncated")}
        server = CollabServer.from_systems({**systems, "tiny": tiny_expert})
        server.load()
        with Running(create_app(server)) as run:
            client = openai.OpenAI(base_url=run.url, api_key="none", max_retries=0, timeout=30)
            ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            for model, words in (("hang", "ReadTimeout"), ("garbage", "not JSON")):
                with pytest.raises(openai.InternalServerError) as e:
                    client.chat.completions.create(model=model, **ask)
                assert f"remote expert '{model}'" in e.value.body["message"] and words in e.value.body["message"]
            for model, words in (("drop", "the stream broke off"), ("truncated", "the stream ended before its answer did")):
                got: list[str] = []
                with pytest.raises(openai.APIError, match=words):
                    for chunk in client.chat.completions.create(model=model, stream=True, **ask):
                        got.extend(c.delta.content or "" for c in chunk.choices)
                assert "".join(got) == "Hello there"  # what came before the break reached the client
            assert client.chat.completions.create(model="tiny", **ask).choices[0].message.content == tiny_expert.generate(GenerationRequest(**ask)).text
        server.close()
