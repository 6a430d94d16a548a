"""The gate: which expert (branch) answers each query.

A gate returns, per request, a ``GateDecision``: the branch (None: the base alone,
no branch), the scores it weighed and why. Two kinds ship:

- ``RouterGate``: any collab router directory (``collab route train``) whose
  experts are the branch names, optionally with the base's name meaning "no
  branch". It routes exactly as a ``type: route`` system over those experts would
  (the same router, policy and routing text), which it builds through the spec's
  system-type registry: collab's core never imports the routers package itself.
- ``FixedGate``: every query to one branch (or the base).

Any object with ``choose(requests)`` and ``describe()`` is a gate (``Gate``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from collab.errors import CollabError, RequestError, SpecError
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk


@dataclass
class GateDecision:
    """One query's choice: ``branch`` (None: the base alone), the score of every
    expert the gate weighed, and the gate's reason."""

    branch: str | None
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""


class Gate(Protocol):
    """Chooses a branch per request."""

    def choose(self, requests: Sequence[GenerationRequest]) -> list[GateDecision]: ...

    def describe(self) -> dict[str, Any]: ...


class FixedGate:
    """Every query to ``branch`` (None: the base)."""

    def __init__(self, branch: str | None) -> None:
        self.branch = branch

    def choose(self, requests: Sequence[GenerationRequest]) -> list[GateDecision]:
        return [GateDecision(self.branch, {}, "fixed") for _ in requests]

    def describe(self) -> dict[str, Any]:
        return {"type": "fixed", "branch": self.branch}


def router_experts(router_dir: str | Path) -> list[str]:
    """The expert names a router directory was trained on (its config.json; no torch,
    no routers import); CollabError naming the file otherwise."""
    cfg = Path(router_dir) / "config.json"
    if not Path(router_dir).is_dir():
        raise CollabError(
            f"{router_dir}: router directory not found (train one with: collab route train)"
        )
    if not cfg.is_file():
        raise CollabError(
            f"{router_dir}: no config.json (not a trained router directory; train one with: collab route train)"
        )
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CollabError(f"{cfg}: not valid JSON ({e.msg})") from e
    experts = raw.get("experts") if isinstance(raw, dict) else None
    if (
        not isinstance(experts, list)
        or not experts
        or not all(isinstance(e, str) for e in experts)
    ):
        raise CollabError(
            f"{cfg}: experts: expected a non-empty list of expert names, found {experts!r}"
        )
    return experts


class _Target(BaseSystem):
    """A name the gate's router may pick (a branch or the base); the gate only routes,
    so nothing answers through it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def generate(self, request: GenerationRequest) -> Completion:
        raise RequestError(
            f"'{self.name}' is a CCoE gate's choice, not a system; ask the CCoE system"
        )

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        raise RequestError(
            f"'{self.name}' is a CCoE gate's choice, not a system; ask the CCoE system"
        )


class _RouterSpec:
    """What ``type: route``'s builder reads of a spec, for a route system over the gate's
    choices: absolute paths, and a system per choice."""

    def __init__(self, targets: Sequence[str], where: str) -> None:
        self.targets = list(targets)
        self.where = where

    def resolve_path(self, value: str) -> Path:
        return Path(value)

    def system(self, name: str) -> _Target:
        if name not in self.targets:
            raise CollabError(
                f"{self.where}: the router's expert '{name}' is neither a branch nor the base; expected some of {', '.join(self.targets)}"
            )
        return _Target(name)

    def error(self, key_path: str, message: str) -> SpecError:
        return SpecError(f"{self.where}: {key_path}: {message}")


class RouterGate:
    """A collab router over the branch names (and optionally ``base``, meaning no
    branch), used as ``type: route`` would use it; ``device`` runs its encoder."""

    def __init__(
        self,
        router_dir: str | Path,
        branches: Sequence[str],
        base: str,
        *,
        device: str = "cpu",
    ) -> None:
        from collab.spec import system_types

        self.router_dir = Path(router_dir)
        self.base = base
        targets = [*branches, base]
        names = router_experts(self.router_dir)
        unknown = [n for n in names if n not in targets]
        if unknown:
            raise CollabError(
                f"{self.router_dir}: the router's expert '{unknown[0]}' is neither a branch ({', '.join(branches)}) nor the base ('{base}'); "
                "train the gate's router on the branch names"
            )
        types = system_types()
        if "route" not in types:
            raise CollabError(
                "a router gate needs collab's routers package (the 'route' system type), which is not installed"
            )
        config = {
            "type": "route",
            "router": str(self.router_dir),
            "experts": names,
            "device": device,
        }
        self.routed = types["route"]().build(
            _RouterSpec(targets, str(self.router_dir)), "gate", config
        )

    def choose(self, requests: Sequence[GenerationRequest]) -> list[GateDecision]:
        out = []
        for decision, pred in self.routed.route(list(requests)):
            chosen = self.routed.expert_names[decision.ranking[0]]
            scores = {
                e: round(float(s), 6) for e, s in zip(self.routed.expert_names, pred)
            }
            out.append(
                GateDecision(
                    None if chosen == self.base else chosen,
                    scores,
                    str(decision.reason),
                )
            )
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "type": "router",
            "router": str(getattr(self.routed.router, "key", "router")),
            "policy": str(self.routed.policy.name),
        }
