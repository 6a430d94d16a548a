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
        adapter_batch: false              # true: hold the experts that are LoRA adapters of one base in one
                                          # AdapterBank, unmerged, and batch their rows together (adapter_banks)

The completion is the expert's own, with the route in its trace; the expert's
trace is kept under ``expert_trace``. ``collab route ask`` routes through the same
``RoutedSystem.explain``, built without experts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from collab.errors import CollabError, RequestError
from collab.system import (
    BaseSystem,
    Completion,
    GenerationRequest,
    RendersRequests,
    Scorer,
    StreamChunk,
    scorer,
)
from routers.policies import (
    CascadePolicy,
    CostPolicy,
    Decision,
    Policy,
    PolicyError,
    annotate,
    make_policy,
    parse_costs,
)

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
            except Exception as e:  # the next-ranked expert takes over
                if started:
                    raise
                failures.append({"expert": self.expert_names[j], "error": f"{type(e).__name__}: {e}"})
                last_error = e
        assert last_error is not None
        raise last_error

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Route all requests at once, then one ``generate_batch`` per chosen expert.

        Experts that are LoRA adapters of one base held unmerged in an ``AdapterBank``
        (``collab.adapters``; a spec's ``adapter_batch: true``) share one batch: the
        rows routed to any of them (or to the bank's base) decode together, one forward
        per step with each row's own adapter, instead of one pass per expert. Each
        completion's trace names its row's expert either way."""
        if isinstance(self.policy, CascadePolicy):
            return [self.generate(r) for r in requests]
        from collab.adapters import AdapterExpert

        routed = self.route(requests)
        groups: dict[int, list[int]] = {}
        for i, (d, _) in enumerate(routed):
            groups.setdefault(d.ranking[0], []).append(i)
        banks: dict[int, list[int]] = {}  # one batch per bank: the experts routed to, by bank
        for j in groups:
            expert = self._expert(j)
            if isinstance(expert, AdapterExpert):
                banks.setdefault(id(expert.bank), []).append(j)
        out: list[Completion | None] = [None] * len(requests)
        for members in banks.values():
            idx = [i for j in members for i in groups.pop(j)]
            views = [self._expert(routed[i][0].ranking[0]) for i in idx]
            bank = views[0].bank  # type: ignore[attr-defined]
            try:
                batch: list[Completion | None] = list(bank.generate_batch([requests[i] for i in idx], [v.name for v in views]))
            except Exception:  # redo this batch one by one, with fallback
                if not self.fallback:
                    raise
                batch = [None] * len(idx)
            self._collect(requests, routed, idx, batch, out)
        for j, idx in groups.items():
            expert = self._expert(j)
            try:
                batch = list(expert.generate_batch([requests[i] for i in idx]))
            except Exception:  # redo this group one by one, with fallback
                if not self.fallback:
                    raise
                batch = [None] * len(idx)
            self._collect(requests, routed, idx, batch, out)
        return [c for c in out if c is not None]

    def _collect(
        self,
        requests: Sequence[GenerationRequest],
        routed: list[tuple[Decision, np.ndarray]],
        idx: list[int],
        batch: list[Completion | None],
        out: list[Completion | None],
    ) -> None:
        """Put a batch's completions (rows ``idx``) in ``out`` with their route traces;
        a row the batch did not answer is generated alone, with fallback."""
        for i, c in zip(idx, batch):
            if c is None:
                out[i] = self.generate(requests[i])
            else:
                d, pred = routed[i]
                c.trace = self._trace(d, pred, d.ranking[0], c.trace, [])
                out[i] = c


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

    keys: ClassVar[set[str]] = {"type", "router", "experts", "policy", "costs", "last_turn_only", "fallback", "names", "device", "adapter_batch"}

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        spec.reject_unknown_keys(config, kp, "route", self.keys)
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
        for key in ("last_turn_only", "fallback", "adapter_batch"):
            if key in config and not isinstance(config[key], bool):
                raise spec.error(f"{kp}.{key}", f"expected true or false, found {config[key]!r}")
        if config.get("adapter_batch") and not adapter_groups(spec, experts):
            raise spec.error(
                f"{kp}.adapter_batch",
                f"no experts of {kp}.experts to batch together: it needs two or more local experts that are LoRA adapters of one base model "
                f"(or one adapter and its base), loaded with the same options",
            )
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
        shared = adapter_banks(spec, spec_names) if config.get("adapter_batch") else {}
        experts = {e: shared[e] if e in shared else spec.system(e) for e in spec_names}
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


# ------------------------------------------------------------- adapter banks
# ``adapter_batch: true`` on a route system: the experts in its list that are LoRA
# adapters of one base (and that base, if listed) are loaded once, as one
# ``collab.adapters.AdapterBank`` with the adapters unmerged, instead of one merged
# model each; the route system gets the bank's per-adapter experts, and
# ``RoutedSystem.generate_batch`` decodes the rows routed to any of them in one
# batch. The bank belongs to the route system: the spec's experts of the same names,
# asked for by name elsewhere (``spec.system("arith")``, or ``collab serve``, which
# serves every expert), are the usual merged ones, loaded separately.
_LOAD_OPTIONS = ("dtype", "device", "prompt_format", "allow_pickle", "batch_size")


def adapter_groups(spec: Any, names: Sequence[str]) -> list[list[str]]:
    """The groups of ``names`` (spec experts) that can share an ``AdapterBank``: local
    experts that are LoRA adapters of one base, or that base, loaded with the same options."""
    from collab.adapters import adapter_groups as groups_of_refs

    by_options: dict[str, dict[str, str]] = {}
    for n in names:
        es = spec.experts.get(n)
        if es is None or es.remote or es.ref is None:
            continue  # a system, or a remote expert
        options = json.dumps({k: es.options[k] for k in _LOAD_OPTIONS if k in es.options}, sort_keys=True)
        by_options.setdefault(options, {})[n] = es.ref
    return [g for refs in by_options.values() for g in groups_of_refs(refs)]


def adapter_banks(spec: Any, names: Sequence[str]) -> dict[str, BaseSystem]:
    """One ``AdapterBank`` per group of ``adapter_groups``, loaded once; its expert for each
    name of the group (the others are not in the mapping)."""
    from collab.adapters import AdapterBank

    out: dict[str, BaseSystem] = {}
    for group in adapter_groups(spec, names):
        es = spec.experts[group[0]]
        options = {k: es.options[k] for k in _LOAD_OPTIONS if k in es.options}
        bank = AdapterBank.from_refs({n: spec.experts[n].ref for n in group}, **options)
        out.update((n, bank.expert(n)) for n in group)
    return out
