"""Bad input and faults: the right status and error body, and the server keeps serving."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from collab.server import CollabServer, ServeOptions, create_app
from collab.system import BaseSystem, Completion, GenerationRequest
from tests.server.helpers import KEY, Running, Served

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def post(served: Served, body: Any, path: str = "/chat/completions", **kw: Any) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    if isinstance(body, (bytes, str)):
        return httpx.post(served.url + path, content=body, headers={"content-type": "application/json", **headers}, timeout=60, **kw)
    return httpx.post(served.url + path, json=body, headers=headers, timeout=60, **kw)


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def still_serving(served: Served) -> None:
    r = post(served, CHAT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_malformed_json_is_400(served: Served) -> None:
    e = error(post(served, b'{"model": "tiny", "messages": ['), 400)
    assert e["code"] == "invalid_json" and "malformed JSON" in e["message"]
    still_serving(served)


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"messages": "hi"}, "messages"),
        ({"max_tokens": "12"}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"temperature": "hot"}, "temperature"),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
        ({"model": None}, "model"),
        ({"stop": 3}, "stop"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type"),
    ],
)
def test_wrong_types_are_422_naming_the_field(served: Served, patch: dict[str, Any], param: str) -> None:
    e = error(post(served, {**CHAT, **patch}), 422)
    assert e["param"] == param and e["code"] == "invalid_schema"


def test_a_body_that_is_not_an_object_is_422(served: Served) -> None:
    error(post(served, b"[1, 2, 3]"), 422)
    error(post(served, {}), 422)


@pytest.mark.parametrize(
    "patch, param, words",
    [
        ({"max_tokens": -5}, "max_tokens", "expected 1 <= max_tokens"),
        ({"max_tokens": 0}, "max_tokens", "expected 1 <= max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens", "context window (256 tokens)"),
        ({"max_completion_tokens": 10**12}, "max_tokens", "expected 1 <= max_tokens"),
        ({"messages": []}, "messages", "at least one message"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "found 'wizard'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]", "only text parts"),
        ({"temperature": -1}, "temperature", "0 <= temperature <= 2"),
        ({"top_p": 0}, "top_p", "0 < top_p <= 1"),
        ({"n": 0}, "n", "1 <= n <= 8"),
        ({"n": 1000}, "n", "1 <= n <= 8"),
        ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ],
)
def test_bad_values_are_400_naming_the_field(served: Served, patch: dict[str, Any], param: str, words: str) -> None:
    e = error(post(served, {**CHAT, **patch}), 400)
    assert e["param"] == param and words in e["message"] and e["type"] == "invalid_request_error"


def test_text_parts_and_developer_role_are_read(served: Served) -> None:
    parts = {**CHAT, "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]}
    plain = {**CHAT, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    a, b = post(served, parts).json(), post(served, plain).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]


def test_prompt_over_the_context_window_is_413(served: Served) -> None:
    e = error(post(served, {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}), 413)
    assert e["code"] == "context_length_exceeded" and "context window of 256 tokens" in e["message"]
    e = error(post(served, {"model": "tiny", "prompt": "word " * 400, "stream": True}, "/completions"), 413)
    still_serving(served)


def test_a_10_mb_body_is_413_without_being_read(served: Served) -> None:
    big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * (10 << 20) + b'"}]}'
    e = error(post(served, big), 413)
    assert e["code"] == "body_too_large" and "limit of 1048576 bytes" in e["message"]

    def chunks() -> Any:  # no content-length: the limit is counted as the body arrives
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    r = httpx.post(served.url + "/chat/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"}, timeout=60)
    e = error(r, 413)
    assert "limit of 1048576 bytes" in e["message"]
    still_serving(served)


def test_auth_covers_every_v1_path_but_not_health(served: Served) -> None:
    for method, path in (("GET", "/models"), ("POST", "/chat/completions"), ("POST", "/completions"), ("GET", "/models/tiny")):
        e = error(httpx.request(method, served.url + path, json=CHAT, timeout=30), 401)
        assert e["type"] == "authentication_error" and "missing API key" in e["message"]
        error(httpx.request(method, served.url + path, json=CHAT, headers={"Authorization": "Bearer nope"}, timeout=30), 401)
        error(httpx.request(method, served.url + path, json=CHAT, headers={"Authorization": KEY}, timeout=30), 401)
    assert httpx.get(served.base + "/health").status_code == 200


def test_unknown_paths_and_methods_use_the_error_format(served: Served) -> None:
    assert error(httpx.get(served.url + "/nope", headers=AUTH), 404)["message"] == "no such path: GET /v1/nope"
    error(httpx.get(served.url + "/chat/completions", headers=AUTH), 405)


class Broken(BaseSystem):
    name = "broken"

    def generate(self, request: GenerationRequest) -> Completion:
        raise RuntimeError("the GPU caught fire")


def test_loading_is_503_and_a_failing_system_is_500(tiny_expert: Any) -> None:
    gate = threading.Event()

    def build(name: str) -> Any:
        gate.wait(30)
        return {"tiny": tiny_expert, "broken": Broken()}[name]

    server = CollabServer(["tiny", "broken"], build, ServeOptions())
    with Running(create_app(server)) as run:
        h = httpx.get(run.base + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        assert [m["id"] for m in httpx.get(run.url + "/models").json()["data"]] == ["tiny", "broken"]
        e = error(httpx.post(run.url + "/chat/completions", json=CHAT), 503)
        assert e["code"] == "loading" and "retry" in e["message"]
        loader = threading.Thread(target=server.load)
        loader.start()
        gate.set()
        loader.join(30)
        assert httpx.get(run.base + "/health").json()["status"] == "ready"
        e = error(httpx.post(run.url + "/chat/completions", json={**CHAT, "model": "broken"}), 500)
        assert e["message"] == "model 'broken' failed: RuntimeError: the GPU caught fire" and e["code"] == "expert_failed"
        for stream in (False, True):
            r = httpx.post(run.url + "/chat/completions", json={**CHAT, "stream": stream})
            assert r.status_code == 200
    server.close()


def test_failed_load_reports_the_error_on_health(tiny_expert: Any) -> None:
    def build(name: str) -> Any:
        raise FileNotFoundError("model.safetensors not found")

    server = CollabServer(["x"], build)
    with pytest.raises(FileNotFoundError):
        server.load()
    with Running(create_app(server)) as run:
        h = httpx.get(run.base + "/health")
        assert h.status_code == 503 and h.json() == {"status": "failed", "models": ["x"], "loaded": 0, "error": "model.safetensors not found"}
        assert error(httpx.post(run.url + "/chat/completions", json={**CHAT, "model": "x"}), 503)["code"] == "load_failed"


def test_one_failing_request_in_a_batch_does_not_spoil_the_others(tiny_model_dir: Path, tiny_expert: Any) -> None:
    from collab.experts import Expert

    expert = Expert.load(tiny_model_dir, name="tiny")
    real = expert.stops_for

    def stops_for(request: GenerationRequest) -> list[str]:
        if "POISON" in (request.text_for_routing()):
            raise RuntimeError("poisoned row")
        return real(request)

    expert.stops_for = stops_for  # type: ignore[method-assign]
    server = CollabServer.from_systems({"tiny": expert}, ServeOptions(max_wait_ms=400))
    server.load()
    prompts = ["What is 2 + 2?", "POISON", "The capital of France is"]
    results: dict[str, httpx.Response] = {}
    with Running(create_app(server)) as run:

        def ask(p: str) -> None:
            results[p] = httpx.post(run.url + "/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": p}], "max_tokens": 10}, timeout=60)

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    server.close()
    assert server.metrics.batch_size.count(expert="tiny") >= 2  # the batch of three, then each redone alone
    e = error(results["POISON"], 500)
    assert e["message"] == "expert 'tiny' failed: RuntimeError: poisoned row"
    for p in prompts[::2]:
        assert results[p].json()["choices"][0]["message"]["content"] == tiny_expert.generate(GenerationRequest.chat(p, max_tokens=10)).text
