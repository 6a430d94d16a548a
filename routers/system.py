"""RoutedSystem: a System that sends each request to one expert chosen by a router.

In a spec::

    systems:
      auto:
        type: route
        router: artefacts/router-knn      # a directory written by `collab route train`
        experts: [smol, gemma]
        policy: best                      # or {type: cost, lambda: 0.1}, {type: budget, ...}, {type: cascade, ...}
        costs: {smol: 1, gemma: 4}        # optional: each expert's cost (default: the router's mean training costs)
        last_turn_only: false             # route on the whole conversation (default) or the last user turn
        names: {router-name: spec-name}   # optional: the router's expert names -> the spec's
        fallback: true                    # on an expert error, try the next-ranked expert

The completion is the expert's own, with the route in its trace; the expert's
trace is kept under ``expert_trace``. ``collab route ask`` routes through the same
``RoutedSystem.explain``, built without experts.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from collab.errors import CollabError, RequestError
from collab.system import BaseSystem, Completion, GenerationRequest, RendersRequests, Scorer, StreamChunk, scorer
from routers.policies import CascadePolicy, CostPolicy, Decision, Policy, PolicyError, annotate, make_policy, parse_costs

if TYPE_CHECKING:
    from routers.base import Router


class RoutedSystem(BaseSystem):
    """Routes each request among ``experts`` (name -> System) with ``router`` and ``policy``.

    ``costs`` are each expert's cost in the router's expert order, for policies that
    weigh cost; by default the router's mean training costs (``meta.train_mean_costs``,
    recorded by ``collab route train``). A policy's own costs (``policy.costs``) win
    over both. ``experts=None`` builds a system that only routes (``route``,
    ``explain``), as ``collab route ask`` does; it cannot generate."""

    def __init__(
        self,
        name: str,
        router: Router,
        experts: Mapping[str, BaseSystem] | None,
        policy: Policy | None = None,
        last_turn_only: bool = False,
        fallback: bool = True,
        names: dict[str, str] | None = None,
        costs: Sequence[float] | None = None,
    ) -> None:
        from routers.policies import BestQualityPolicy

        self.name = name
        self.router = router
        names = names or {}
        self.expert_names = [names.get(e, e) for e in router.experts]  # spec names, in router order
        if experts is not None:
            missing = [e for e in self.expert_names if e not in experts]
            if missing:
                raise ValueError(f"route system '{name}': router expert '{missing[0]}' has no system (given: {', '.join(experts)})")
        self.experts = experts
        self.policy = policy or BestQualityPolicy()
        self.last_turn_only = last_turn_only
        self.fallback = fallback
        self.costs_source = "the route system's costs" if costs is not None else "the router's mean training costs"
        if costs is None:
            costs = router.meta.get("train_mean_costs")
        if costs is not None and len(costs) != len(self.expert_names):
            raise PolicyError(f"route system '{name}': {len(costs)} costs for the router's {len(self.expert_names)} experts ({', '.join(self.expert_names)})")
        self.costs = np.asarray(costs, dtype=np.float64) if costs is not None else None
        if isinstance(self.policy, CostPolicy) and self.policy.costs is None and self.costs is None:
            raise PolicyError(
                f"route system '{name}': policy 'cost' needs each expert's cost, and router '{router.key}' records no training costs; "
                f"give them in the spec (systems.{name}.costs: {{{', '.join(f'{e}: 1' for e in self.expert_names)}}})"
            )
        if isinstance(self.policy, CascadePolicy) and experts is not None:
            scorer(experts[self.expert_names[self.policy.cheap]], "a cascade's cheap expert")

    # ------------------------------------------------------------ routing
    def route(self, requests: Sequence[GenerationRequest]) -> list[tuple[Decision, np.ndarray]]:
        """For each request: the policy's decision and the router's (E,) predicted scores."""
        texts = [r.text_for_routing(last_turn_only=self.last_turn_only) for r in requests]
        pred, notes = self.router.explain(texts)
        decisions = self.policy.decide(pred, self.expert_names, self.costs)
        for d, note in zip(decisions, notes):
            if note:
                annotate(d, note)
        return list(zip(decisions, pred))

    def policy_costs(self) -> tuple[list[float], str] | None:
        """The costs the policy weighs and where they come from, or None if it weighs none."""
        if not isinstance(self.policy, CostPolicy):
            return None
        if self.policy.costs is not None:
            return [float(c) for c in self.policy.costs], "the policy"
        assert self.costs is not None  # checked in __init__
        return [float(c) for c in self.costs], self.costs_source

    def explain(self, request: GenerationRequest) -> dict[str, Any]:
        """Why ``request`` goes where it goes, without generating: the chosen expert, the
        ranking, every expert's predicted score, the policy, its reason, the costs it
        weighed (cost policy) and the router's notes (e.g. the guard's verdict)."""
        decision, pred = self.route([request])[0]
        out: dict[str, Any] = {
            "routed_to": self.expert_names[decision.ranking[0]],
            "scores": {e: float(s) for e, s in zip(self.expert_names, pred)},
            "ranking": [self.expert_names[j] for j in decision.ranking],
            "policy": self.policy.name,
            "reason": decision.reason,
            "router": self.router.key,
        }
        weighed = self.policy_costs()
        if weighed is not None:
            out["costs"] = dict(zip(self.expert_names, weighed[0]))
            out["costs_from"] = weighed[1]
        out.update(decision.extra)
        return out

    def _expert(self, j: int) -> BaseSystem:
        if self.experts is None:
            raise RequestError(f"route system '{self.name}' was built to route only (no experts), so it cannot generate")
        return self.experts[self.expert_names[j]]

    def _trace(self, decision: Decision, pred: np.ndarray, chosen: int, expert_trace: Any, failures: list[dict[str, str]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        t: dict[str, Any] = {
            "system": self.name,
            "type": "route",
            "routed_to": self.expert_names[chosen],
            "scores": {e: round(float(s), 6) for e, s in zip(self.expert_names, pred)},
            "policy": self.policy.name,
            "reason": decision.reason,
            "expert_trace": expert_trace,
        }
        if failures:
            t["fallback"] = failures
        if decision.extra:
            t.update(decision.extra)
        if extra:
            t.update(extra)
        return t

    def _candidates(self, decision: Decision) -> list[int]:
        return decision.ranking if self.fallback else decision.ranking[:1]

    # ---------------------------------------------------------- generation
    def generate(self, request: GenerationRequest) -> Completion:
        decision, pred = self.route([request])[0]
        if isinstance(self.policy, CascadePolicy):
            return self._cascade(request, decision, pred)
        failures: list[dict[str, str]] = []
        last_error: Exception | None = None
        for j in self._candidates(decision):
            expert = self._expert(j)
            try:
                c = expert.generate(request)
            except Exception as e:  # noqa: BLE001 - fall back to the next-ranked expert
                failures.append({"expert": self.expert_names[j], "error": f"{type(e).__name__}: {e}"})
                last_error = e
                continue
            c.trace = self._trace(decision, pred, j, c.trace, failures)
            return c
        assert last_error is not None
        raise last_error

    def _cascade(self, request: GenerationRequest, decision: Decision, pred: np.ndarray) -> Completion:
        policy = self.policy
        assert isinstance(policy, CascadePolicy)
        cheap = scorer(self._expert(policy.cheap), "a cascade's cheap expert")
        c = cheap.generate(request)
        conf = answer_confidence(cheap, request, c)
        if not policy.escalate(conf):
            c.trace = self._trace(decision, pred, policy.cheap, c.trace, [], {"confidence": conf, "reason": f"cascade: {self.expert_names[policy.cheap]} confident ({conf:.3f} >= {policy.threshold:.3f})"})
            return c
        strong = self._expert(policy.strong)
        s = strong.generate(request)
        reason = f"cascade: {self.expert_names[policy.cheap]} unsure ({conf:.3f} < {policy.threshold:.3f}), escalated to {self.expert_names[policy.strong]}"
        s.trace = self._trace(decision, pred, policy.strong, s.trace, [], {"confidence": conf, "reason": reason, "cheap_trace": c.trace})
        s.usage.prompt_tokens += c.usage.prompt_tokens
        s.usage.completion_tokens += c.usage.completion_tokens
        return s

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """Stream from the chosen expert; the route trace rides on the final chunk.
        Falls back to the next-ranked expert only if the chosen one fails before its first chunk."""
        decision, pred = self.route([request])[0]
        if isinstance(self.policy, CascadePolicy):
            c = self._cascade(request, decision, pred)
            yield StreamChunk(text=c.text, finish_reason=c.finish_reason, usage=c.usage, trace=c.trace)
            return
        failures: list[dict[str, str]] = []
        last_error: Exception | None = None
        for j in self._candidates(decision):
            expert = self._expert(j)
            started = False
            try:
                for chunk in expert.stream(request):
                    started = True
                    if chunk.finish_reason is not None:
                        chunk.trace = self._trace(decision, pred, j, chunk.trace, failures)
                    yield chunk
                return
            except Exception as e:  # noqa: BLE001
                if started:
                    raise
                failures.append({"expert": self.expert_names[j], "error": f"{type(e).__name__}: {e}"})
                last_error = e
        assert last_error is not None
        raise last_error

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Route all requests at once, then one ``generate_batch`` per chosen expert."""
        if isinstance(self.policy, CascadePolicy):
            return [self.generate(r) for r in requests]
        routed = self.route(requests)
        groups: dict[int, list[int]] = {}
        for i, (d, _) in enumerate(routed):
            groups.setdefault(d.ranking[0], []).append(i)
        out: list[Completion | None] = [None] * len(requests)
        for j, idx in groups.items():
            expert = self._expert(j)
            try:
                batch: list[Completion | None] = list(expert.generate_batch([requests[i] for i in idx]))
            except Exception:  # noqa: BLE001 - redo this group one by one, with fallback
                if not self.fallback:
                    raise
                batch = [None] * len(idx)
            for i, c in zip(idx, batch):
                if c is None:
                    out[i] = self.generate(requests[i])
                else:
                    d, pred = routed[i]
                    c.trace = self._trace(d, pred, j, c.trace, [])
                    out[i] = c
        return [c for c in out if c is not None]


def answer_confidence(expert: Scorer, request: GenerationRequest, completion: Completion) -> float:
    """Mean token log-probability of ``completion.text`` given the text the expert was fed:
    its rendering of ``request`` (an Expert applies its chat template), or the raw prompt.
    A chat request to an expert that cannot render one (a remote expert) is a PolicyError."""
    if not completion.text:
        return 0.0
    if isinstance(expert, RendersRequests):
        context = expert.render(request)
    elif request.prompt is not None:
        context = request.prompt
    else:
        raise PolicyError(
            f"cascade: the cheap expert '{expert.name}' cannot render a chat request into the text its model was given "
            f"(it has no render, e.g. a remote expert), so its answer's confidence cannot be scored; send a raw prompt or make a local expert the cheap one"
        )
    ll = expert.loglikelihood(context, completion.text)
    return float(ll) / max(1, completion.usage.completion_tokens)


class RoutedSystemType:
    """``type: route`` in a spec: validates the router directory and the experts, builds a RoutedSystem."""

    keys = {"type", "router", "experts", "policy", "costs", "last_turn_only", "fallback", "names", "device"}

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        unknown = set(config) - self.keys
        if unknown:
            raise spec.error(f"{kp}.{sorted(unknown)[0]}", f"unknown key for type 'route'; expected some of {', '.join(sorted(self.keys))}")
        d = spec.require_dir(config, "router", kp)
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise spec.error(f"{kp}.router", f"'{config['router']}' has no config.json (train one with: collab route train)")
        try:
            rcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise spec.error(f"{kp}.router", f"{cfg_path}: not valid JSON ({e.msg})") from e
        experts = spec.require_experts(config, "experts", kp, min_count=1)
        names = config.get("names") or {}
        if not isinstance(names, dict):
            raise spec.error(f"{kp}.names", f"expected a mapping router-expert -> spec-expert, found {names!r}")
        router_experts = [names.get(e, e) for e in rcfg.get("experts") or []]
        for e in router_experts:
            if e not in experts:
                raise spec.error(f"{kp}.experts", f"the router was trained on expert '{e}', which is not in {kp}.experts ({', '.join(experts)}); add it or map it with {kp}.names")
        for e in experts:
            if e not in router_experts:
                raise spec.error(f"{kp}.experts", f"expert '{e}' is not one the router was trained on ({', '.join(router_experts) or 'none'})")
        if "device" in config:
            from routers.encoders import check_device

            try:
                check_device(config["device"])
            except CollabError as e:
                raise spec.error(f"{kp}.device", str(e)) from e
        for key in ("last_turn_only", "fallback"):
            if key in config and not isinstance(config[key], bool):
                raise spec.error(f"{kp}.{key}", f"expected true or false, found {config[key]!r}")
        try:
            policy = make_policy(config.get("policy"), router_experts)
        except ValueError as e:
            raise spec.error(f"{kp}.policy", str(e)) from e
        if "costs" in config:
            if isinstance(config.get("policy"), dict) and "costs" in config["policy"]:
                raise spec.error(f"{kp}.costs", f"given twice, here and in {kp}.policy.costs; keep one")
            try:
                parse_costs(config["costs"], router_experts, "costs")
            except PolicyError as e:
                raise spec.error(f"{kp}.costs", str(e)) from e
        elif isinstance(policy, CostPolicy) and policy.costs is None and not (rcfg.get("meta") or {}).get("train_mean_costs"):
            raise spec.error(
                f"{kp}.policy",
                f"policy 'cost' needs each expert's cost, and the router '{config['router']}' records no training costs; "
                f"give them as {kp}.costs: {{{', '.join(f'{e}: 1' for e in router_experts)}}}",
            )

    def build(self, spec: Any, name: str, config: dict[str, Any]) -> RoutedSystem:
        from routers.base import Router

        kp = f"systems.{name}"
        router = Router.load(spec.resolve_path(config["router"])).to(str(config.get("device", "cpu")))
        names = config.get("names") or {}
        spec_names = [names.get(e, e) for e in router.experts]
        experts = {e: spec.system(e) for e in spec_names}
        policy = make_policy(config.get("policy"), spec_names)
        costs = parse_costs(config["costs"], spec_names, f"{kp}.costs") if "costs" in config else None
        try:
            return RoutedSystem(
                name,
                router,
                experts,
                policy=policy,
                last_turn_only=bool(config.get("last_turn_only", False)),
                fallback=bool(config.get("fallback", True)),
                names=names,
                costs=costs,
            )
        except RequestError as e:  # a cascade's cheap expert that cannot score text
            raise spec.error(f"{kp}.policy.cheap", str(e)) from e
