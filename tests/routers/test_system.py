from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collab.errors import SpecError
from collab.spec import load_spec
from collab.system import Completion, GenerationRequest, collect_stream
from routers.baselines import constant_router
from routers.system import RoutedSystem
from tests.contract import SystemContract


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from collab.experts import Expert
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("route-experts")
    a = Expert.load(make_tiny_model(root / "a", seed=11), name="a")
    b = Expert.load(make_tiny_model(root / "b", seed=12), name="b")
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def always_a_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("routers") / "always-a"
    constant_router(["a", "b"], [0.9, 0.1]).save(d)
    return d


def test_always_a_equals_expert_a_greedy(two_experts: dict[str, Any], always_a_dir: Path) -> None:
    from routers.base import Router

    sys_ = RoutedSystem("auto", Router.load(always_a_dir), two_experts)
    for prompt in ["What is 2 + 2?", "The capital of France is", "def add(a, b):"]:
        req = GenerationRequest.chat(prompt, max_tokens=12)
        routed = sys_.generate(req)
        direct = two_experts["a"].generate(req)
        other = two_experts["b"].generate(req)
        assert routed.text == direct.text and routed.usage == direct.usage
        assert routed.text != other.text or prompt == "def add(a, b):"
        t = routed.trace
        assert t["system"] == "auto" and t["type"] == "route" and t["routed_to"] == "a"
        assert t["scores"] == {"a": 0.9, "b": 0.1} and t["policy"] == "best" and "a at 0.900" in t["reason"]
        assert t["expert_trace"]["expert"] == "a"


def test_stream_carries_route_trace(two_experts: dict[str, Any], always_a_dir: Path) -> None:
    from routers.base import Router

    sys_ = RoutedSystem("auto", Router.load(always_a_dir), two_experts)
    req = GenerationRequest.chat("Hello there!", max_tokens=10)
    chunks = list(sys_.stream(req))
    assert all(c.trace is None for c in chunks[:-1])
    c = collect_stream(iter(chunks))
    assert c.text == two_experts["a"].generate(req).text and c.trace["routed_to"] == "a"


class _Failing:
    name = "broken"

    def generate(self, request: GenerationRequest) -> Completion:
        raise RuntimeError("endpoint down")

    def stream(self, request: GenerationRequest):  # noqa: ANN201
        raise RuntimeError("endpoint down")
        yield  # pragma: no cover


def test_fallback_to_next_ranked(two_experts: dict[str, Any]) -> None:
    router = constant_router(["broken", "b"], [0.9, 0.5])
    sys_ = RoutedSystem("auto", router, {"broken": _Failing(), "b": two_experts["b"]})
    req = GenerationRequest.chat("What is 2 + 2?", max_tokens=8)
    c = sys_.generate(req)
    assert c.text == two_experts["b"].generate(req).text
    assert c.trace["routed_to"] == "b" and c.trace["fallback"][0] == {"expert": "broken", "error": "RuntimeError: endpoint down"}
    assert collect_stream(sys_.stream(req)).trace["routed_to"] == "b"
    no_fb = RoutedSystem("auto", router, {"broken": _Failing(), "b": two_experts["b"]}, fallback=False)
    with pytest.raises(RuntimeError, match="endpoint down"):
        no_fb.generate(req)


class _PromptRouter:
    """Predicts expert b for prompts mentioning 'capital', else a (a real keyword router)."""

    experts = ["a", "b"]

    def predict(self, prompts: list[str]) -> np.ndarray:
        return np.array([[0.2, 0.8] if "capital" in p else [0.8, 0.2] for p in prompts])


def test_generate_batch_groups_per_expert(two_experts: dict[str, Any]) -> None:
    sys_ = RoutedSystem("auto", _PromptRouter(), two_experts)
    reqs = [GenerationRequest.chat(p, max_tokens=8) for p in ["The capital of France is", "What is 2 + 2?", "capital of Italy?"]]
    out = sys_.generate_batch(reqs)
    assert [c.trace["routed_to"] for c in out] == ["b", "a", "b"]
    assert [c.text for c in out] == [sys_.generate(r).text for r in reqs]


def test_multi_turn_routes_on_conversation_or_last_turn(two_experts: dict[str, Any]) -> None:
    msgs = [{"role": "user", "content": "the capital of Peru?"}, {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "and 2 + 2?"}]
    req = GenerationRequest(messages=msgs, max_tokens=4)
    assert RoutedSystem("auto", _PromptRouter(), two_experts).generate(req).trace["routed_to"] == "b"
    assert RoutedSystem("auto", _PromptRouter(), two_experts, last_turn_only=True).generate(req).trace["routed_to"] == "a"


def test_cascade_escalates_on_low_confidence(two_experts: dict[str, Any]) -> None:
    from routers.policies import CascadePolicy

    req = GenerationRequest.chat("What is 2 + 2?", max_tokens=6)
    never = RoutedSystem("auto", _PromptRouter(), two_experts, policy=CascadePolicy(cheap=0, strong=1, threshold=-1e9))
    c = never.generate(req)
    assert c.trace["routed_to"] == "a" and c.trace["confidence"] < 0 and "confident" in c.trace["reason"]
    always = RoutedSystem("auto", _PromptRouter(), two_experts, policy=CascadePolicy(cheap=0, strong=1, threshold=1e9))
    e = always.generate(req)
    assert e.trace["routed_to"] == "b" and e.text == two_experts["b"].generate(req).text and "escalated to b" in e.trace["reason"]


def _spec(tmp_path: Path, tiny: Path, router: str, experts: str = "[a, b]", extra: str = "") -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(f"experts:\n  a: {{ref: {tiny}}}\n  b: {{ref: {tiny}}}\nsystems:\n  auto: {{type: route, router: {router}, experts: {experts}{extra}}}\n")
    return p


def test_spec_builds_route_system(tmp_path: Path, tiny_model_dir: Path, always_a_dir: Path) -> None:
    spec = load_spec(_spec(tmp_path, tiny_model_dir, str(always_a_dir)))
    sys_ = spec.system("auto")
    assert isinstance(sys_, RoutedSystem)
    c = sys_.generate(GenerationRequest.chat("Hi", max_tokens=4))
    assert c.trace["routed_to"] == "a" and c.trace["system"] == "auto"


def test_spec_errors(tmp_path: Path, tiny_model_dir: Path, always_a_dir: Path) -> None:
    with pytest.raises(SpecError, match=r"spec.yaml: systems.auto.router: directory 'nowhere' not found"):
        load_spec(_spec(tmp_path, tiny_model_dir, "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="has no config.json"):
        load_spec(_spec(tmp_path, tiny_model_dir, "empty"))
    with pytest.raises(SpecError, match="unknown expert 'c'"):
        load_spec(_spec(tmp_path, tiny_model_dir, str(always_a_dir), "[a, c]"))
    with pytest.raises(SpecError, match=r"trained on expert 'b', which is not in systems.auto.experts \(a\)"):
        load_spec(_spec(tmp_path, tiny_model_dir, str(always_a_dir), "[a]"))
    with pytest.raises(SpecError, match="policy.*unknown expert 'zz'"):
        load_spec(_spec(tmp_path, tiny_model_dir, str(always_a_dir), extra=", policy: {type: budget, expensive: zz}"))
    with pytest.raises(SpecError, match=r"spec.yaml: systems.auto.policy: policy.lamda: unknown key for policy type 'cost'; allowed keys: type, lambda, costs"):
        load_spec(_spec(tmp_path, tiny_model_dir, str(always_a_dir), extra=", policy: {type: cost, lamda: 5}"))
    with pytest.raises(SpecError, match=r"systems.auto.device: encoder: device: expected 'cpu', 'cuda'.*found 'gpu0'"):
        load_spec(_spec(tmp_path, tiny_model_dir, str(always_a_dir), extra=", device: gpu0"))
    spec = load_spec(_spec(tmp_path, tiny_model_dir, str(always_a_dir), extra=", device: auto"))
    assert spec.system("auto").generate(GenerationRequest.chat("Hi", max_tokens=2)).trace["routed_to"] == "a"


class TestRoutedSystemContract(SystemContract):
    @pytest.fixture
    def system(self, two_experts: dict[str, Any]) -> Any:
        return RoutedSystem("auto", _PromptRouter(), two_experts)
