from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from collab.errors import RemoteError
from collab.remote import RemoteExpert
from collab.system import GenerationRequest
from tests.collab.openai_peer import Peer, make_app
from tests.contract import SystemContract


@pytest.fixture(scope="module")
def peer(tiny_expert: Any) -> Iterator[Peer]:
    with Peer(make_app(tiny_expert, "tiny-remote", api_key="sekret")) as p:
        yield p


@pytest.fixture(scope="module")
def remote(peer: Peer) -> Iterator[RemoteExpert]:
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


def test_bad_api_key_is_a_clear_error(peer: Peer) -> None:
    r = RemoteExpert(peer.url, "tiny-remote", api_key="wrong")
    with pytest.raises(RemoteError, match="HTTP 401: invalid api key"):
        r.generate(GenerationRequest.chat("hi", max_tokens=2))
    with pytest.raises(RemoteError, match="HTTP 401"):
        list(r.stream(GenerationRequest.chat("hi", max_tokens=2)))


def test_unknown_model_is_a_clear_error(peer: Peer) -> None:
    r = RemoteExpert(peer.url, "nope", api_key="sekret")
    with pytest.raises(RemoteError, match="HTTP 404: model 'nope' not found"):
        r.generate(GenerationRequest.chat("hi", max_tokens=2))


def test_unreachable_endpoint() -> None:
    r = RemoteExpert("http://127.0.0.1:9/v1", "m", timeout=2)
    with pytest.raises(RemoteError, match="remote expert 'm' at http://127.0.0.1:9/v1/chat/completions"):
        r.generate(GenerationRequest.chat("hi", max_tokens=2))


def test_remote_expert_in_a_spec(peer: Peer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_a_live_endpoint_does_not_fall_back(peer: Peer, tmp_path: Path, tiny_model_dir: Path) -> None:
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
