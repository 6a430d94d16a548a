from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collab.errors import SpecError
from collab.spec import load_spec
from collab.system import BaseSystem, Completion, GenerationRequest, collect_stream
from routers.base import Router
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
    sys_ = RoutedSystem("auto", Router.load(always_a_dir), two_experts)
    req = GenerationRequest.chat("Hello there!", max_tokens=10)
    chunks = list(sys_.stream(req))
    assert all(c.trace is None for c in chunks[:-1])
    c = collect_stream(iter(chunks))
    assert c.text == two_experts["a"].generate(req).text and c.trace["routed_to"] == "a"


class _Failing(BaseSystem):
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


class _PromptRouter(Router):
    """Predicts expert b for prompts mentioning 'capital', else a (a real keyword router)."""

    uses_encoder = False

    def __init__(self) -> None:
        super().__init__()
        self.experts = ["a", "b"]

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
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


# ---------------------------------------------------------------- one routing path: costs, route ask


def _close_table(tmp_path: Path) -> Path:
    """'big' answers all 10 queries, 'small' 9 of them at a tenth of the cost: a best-single
    router predicts big 1.0, small 0.9 for every prompt."""
    rows = [
        {"id": f"q{i}", "task": "t", "prompt": f"question number {i}", "scores": {"big": 1.0, "small": float(i != 0)}, "costs": {"big": 10.0, "small": 1.0}}
        for i in range(10)
    ]
    p = tmp_path / "close.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _route_spec(tmp_path: Path, tiny: Path, router: Path, experts: tuple[str, str], extra: str = "") -> Path:
    a, b = experts
    p = tmp_path / "route.yaml"
    p.write_text(f"experts:\n  {a}: {{ref: {tiny}}}\n  {b}: {{ref: {tiny}}}\nsystems:\n  auto: {{type: route, router: {router}, experts: [{a}, {b}]{extra}}}\n")
    return p


def test_spec_cost_policy_weighs_the_router_training_costs(tmp_path: Path, tiny_model_dir: Path) -> None:
    from routers.api import ask, train_router

    router = tmp_path / "best-single"
    train_router([str(_close_table(tmp_path))], "best-single", router)
    req = GenerationRequest(prompt="question number 3", max_tokens=2)

    def routed(extra: str) -> str:
        c = load_spec(_route_spec(tmp_path, tiny_model_dir, router, ("big", "small"), extra)).system("auto").generate(req)
        return c.trace["routed_to"]

    assert routed("") == "big"  # best: 1.0 vs 0.9
    # no costs: key, so the router's mean training costs (10 vs 1): 1.0 - 0.2 < 0.9 - 0.02
    assert routed(", policy: {type: cost, lambda: 0.02}") == "small"
    assert routed(", policy: {type: cost, lambda: 0.02}, costs: {big: 1, small: 1}") == "big"  # the spec's costs win
    assert routed(", policy: {type: cost, lambda: 0.02, costs: {big: 1, small: 1}}") == "big"
    system = load_spec(_route_spec(tmp_path, tiny_model_dir, router, ("big", "small"), ", policy: {type: cost, lambda: 0.02}, costs: {big: 2, small: 1}")).system("auto")
    why = system.explain(req)
    assert why["costs"] == {"big": 2.0, "small": 1.0} and why["costs_from"] == "the route system's costs"
    a = ask(router, "question number 3", {"type": "cost", "lambda": 0.02})
    assert a["routed_to"] == "small" and a["costs"] == {"big": 10.0, "small": 1.0} and a["costs_from"] == "the router's mean training costs"
    assert a["reason"] == "best score - 0.02 x cost: small (0.900 - 0.02 x 1 = 0.880), next big (1.000 - 0.02 x 10 = 0.800)"


def test_route_ask_and_the_spec_agree(tmp_path: Path, tiny_model_dir: Path, synth_path: Path) -> None:
    """`collab route ask` and a spec's route system make the same choice for the same router,
    policy and prompt, also where the cost policy overturns the best-quality choice."""
    from routers.api import ask, train_router

    router = tmp_path / "knn"
    train_router([str(synth_path)], "knn", router, {"encoder": "tfidf", "k": 10})
    prompts = ["Please add the sum and product of 12", "Tell me about the emperor war dynasty in rome", "divide the kingdom by 3", "the battle of the integral"]
    policies = {"best": "", "cost": ", policy: {type: cost, lambda: 0.5}"}
    choices: dict[str, list[str]] = {}
    for key, extra in policies.items():
        system = load_spec(_route_spec(tmp_path, tiny_model_dir, router, ("mathy", "histy"), extra)).system("auto")
        spec_choices = [system.generate(GenerationRequest(prompt=p, max_tokens=1)).trace["routed_to"] for p in prompts]
        asked = [ask(router, p, None if key == "best" else {"type": "cost", "lambda": 0.5}) for p in prompts]
        assert spec_choices == [a["routed_to"] for a in asked], key
        assert [system.explain(GenerationRequest(prompt=p)) for p in prompts] == asked
        choices[key] = spec_choices
    assert choices["best"][1] == "histy" and choices["cost"][1] == "mathy"  # histy costs 4, mathy 1


def test_cost_policy_without_costs_is_an_error(tmp_path: Path, tiny_model_dir: Path, always_a_dir: Path) -> None:
    from routers.api import ask
    from routers.policies import PolicyError

    cost = ", policy: {type: cost, lambda: 0.1}"
    with pytest.raises(SpecError, match=r"route.yaml: systems.auto.policy: policy 'cost' needs each expert's cost, and the router '.*always-a' records no training costs; give them as systems.auto.costs: \{a: 1, b: 1\}"):
        load_spec(_route_spec(tmp_path, tiny_model_dir, always_a_dir, ("a", "b"), cost))
    with pytest.raises(SpecError, match=r"systems.auto.costs: given twice, here and in systems.auto.policy.costs"):
        load_spec(_route_spec(tmp_path, tiny_model_dir, always_a_dir, ("a", "b"), ", policy: {type: cost, costs: {a: 1, b: 2}}, costs: {a: 1, b: 2}"))
    with pytest.raises(SpecError, match=r"systems.auto.costs: costs.b: expected a number >= 0, found 'cheap'"):
        load_spec(_route_spec(tmp_path, tiny_model_dir, always_a_dir, ("a", "b"), cost + ", costs: {a: 1, b: cheap}"))
    with pytest.raises(SpecError, match=r"systems.auto.costs: costs.c: not one of the router's experts \(a, b\)"):
        load_spec(_route_spec(tmp_path, tiny_model_dir, always_a_dir, ("a", "b"), cost + ", costs: {a: 1, b: 2, c: 3}"))
    sys_ = load_spec(_route_spec(tmp_path, tiny_model_dir, always_a_dir, ("a", "b"), ", policy: {type: cost, lambda: 1}, costs: {a: 1, b: 0}")).system("auto")
    assert sys_.explain(GenerationRequest(prompt="hi"))["routed_to"] == "b"  # 0.9 - 1 < 0.1 - 0
    with pytest.raises(PolicyError, match=r"route system 'always-a': policy 'cost' needs each expert's cost, and router 'best-single' records no training costs"):
        ask(always_a_dir, "hi", {"type": "cost", "lambda": 0.1})


def test_a_routing_only_system_cannot_generate(always_a_dir: Path) -> None:
    from collab.errors import RequestError

    sys_ = RoutedSystem("asker", Router.load(always_a_dir), None)
    assert sys_.explain(GenerationRequest(prompt="hi"))["routed_to"] == "a"
    with pytest.raises(RequestError, match="route system 'asker' was built to route only"):
        sys_.generate(GenerationRequest(prompt="hi", max_tokens=2))


# ---------------------------------------------------------------- the cascade's cheap expert


class _Unscored(BaseSystem):
    """A system that answers but cannot score text (no loglikelihood)."""

    name = "unscored"

    def generate(self, request: GenerationRequest) -> Completion:
        return Completion(text="4")


class _ScorerWithoutRender(BaseSystem):
    """An expert seen as a remote one is: it generates and scores text but cannot render a chat request."""

    def __init__(self, expert: Any) -> None:
        self.name, self._expert = "far", expert

    def generate(self, request: GenerationRequest) -> Completion:
        return self._expert.generate(request)

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self._expert.loglikelihood(context, continuation)

    def loglikelihood_batch(self, pairs: Any, batch_size: int | None = None) -> list[tuple[float, bool]]:
        return self._expert.loglikelihood_batch(pairs, batch_size)


def test_cascade_cheap_expert_must_score_text(two_experts: dict[str, Any], tmp_path: Path, tiny_model_dir: Path) -> None:
    from collab.errors import RequestError
    from routers.policies import CascadePolicy, PolicyError
    from routers.system import answer_confidence

    with pytest.raises(RequestError, match="system 'unscored' cannot score text .*which a cascade's cheap expert needs"):
        RoutedSystem("auto", _PromptRouter(), {"a": _Unscored(), "b": two_experts["b"]}, policy=CascadePolicy(cheap=0, strong=1))
    far = _ScorerWithoutRender(two_experts["a"])
    sys_ = RoutedSystem("auto", _PromptRouter(), {"a": far, "b": two_experts["b"]}, policy=CascadePolicy(cheap=0, strong=1, threshold=-1e9))
    raw = GenerationRequest(prompt="2 + 2 =", max_tokens=4)
    c = sys_.generate(raw)
    assert c.trace["routed_to"] == "a" and c.trace["confidence"] == answer_confidence(two_experts["a"], raw, c)
    with pytest.raises(PolicyError, match="cascade: the cheap expert 'far' cannot render a chat request"):
        sys_.generate(GenerationRequest.chat("2 + 2?", max_tokens=4))
    # in a spec: a route system as the cheap expert of another is refused when built
    inner = tmp_path / "inner-router"
    constant_router(["a", "b"], [0.9, 0.1]).save(inner)
    outer = tmp_path / "outer-router"
    constant_router(["inner", "b"], [0.9, 0.1]).save(outer)
    p = tmp_path / "nested.yaml"
    p.write_text(
        f"experts:\n  a: {{ref: {tiny_model_dir}}}\n  b: {{ref: {tiny_model_dir}}}\nsystems:\n  inner: {{type: route, router: {inner}, experts: [a, b]}}\n"
        f"  auto: {{type: route, router: {outer}, experts: [inner, b], policy: {{type: cascade, cheap: inner, strong: b}}}}\n"
    )
    with pytest.raises(SpecError, match=r"nested.yaml: systems.auto.policy.cheap: system 'inner' cannot score text"):
        load_spec(p).system("auto")
