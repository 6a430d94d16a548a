"""A tiny random Llama base (4 layers), two CCoE experts of it at different depths,
their popped standalone models, a router gate over them, and a base of another seed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from collab.ccoe.gate import GateDecision
from collab.system import GenerationRequest

#: Training settings that move the tiny experts well away from the base in a few steps.
QUICK = {
    "steps": 6,
    "batch_size": 4,
    "examples": 16,
    "max_tokens": 48,
    "lr": 1e-2,
    "warmup_steps": 1,
    "checkpoint_every": 2,
}

ARITH = ["What is 12 + 30?", "What is 7 * 6?", "What is 100 - 58?"]
LISTS = [
    "Sort these numbers: 3, 1, 2",
    "Reverse the list [1, 2, 3].",
    "What is the largest number in 4, 9, 2?",
]
PLAIN = ["Hello there! How can I help you today?", "The capital of France is"]


class TrueSkill:
    """A gate that knows each question's skill (by its text): the oracle gate."""

    def __init__(self, of: dict[str, str | None]) -> None:
        self.of = of

    def choose(self, requests: Sequence[GenerationRequest]) -> list[GateDecision]:
        return [
            GateDecision(
                self.of[r.text_for_routing(last_turn_only=True)], {}, "true skill"
            )
            for r in requests
        ]

    def describe(self) -> dict[str, Any]:
        return {"type": "true-skill"}


def true_skill() -> TrueSkill:
    return TrueSkill(
        {
            **{q: "arith" for q in ARITH},
            **{q: "lists" for q in LISTS},
            **{q: None for q in PLAIN},
        }
    )


@pytest.fixture(scope="session")
def ccoe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ccoe")


@pytest.fixture(scope="session")
def base_dir(ccoe_root: Path) -> Path:
    from tests.tiny import make_tiny_model

    return make_tiny_model(ccoe_root / "base", seed=0, layers=4)


@pytest.fixture(scope="session")
def other_base_dir(ccoe_root: Path) -> Path:
    from tests.tiny import make_tiny_model

    return make_tiny_model(ccoe_root / "other-base", seed=5, layers=4)


@pytest.fixture(scope="session")
def base(base_dir: Path) -> Any:
    from collab.experts import Expert

    return Expert.load(base_dir, name="base")


@pytest.fixture(scope="session")
def experts(base: Any, ccoe_root: Path) -> dict[str, Path]:
    """'arith' (the top 2 layers, depth 2) and 'lists' (the top layer, depth 3), trained."""
    from collab.ccoe.train import CCoETrainConfig, train_expert

    return {
        "arith": train_expert(
            base, "skill:arith", ccoe_root / "arith", CCoETrainConfig(layers=2, **QUICK)
        ),
        "lists": train_expert(
            base, "skill:lists", ccoe_root / "lists", CCoETrainConfig(layers=1, **QUICK)
        ),
    }


@pytest.fixture(scope="session")
def popped(base: Any, experts: dict[str, Path], ccoe_root: Path) -> dict[str, Any]:
    """Each expert popped into a standalone model directory and loaded as an Expert."""
    from collab.ccoe.standalone import pop_expert
    from collab.experts import Expert

    return {
        n: Expert.load(pop_expert(d, ccoe_root / f"{n}-popped", base=base), name=n)
        for n, d in experts.items()
    }


@pytest.fixture(scope="session")
def router_dir(ccoe_root: Path) -> Path:
    """A kNN router (TF-IDF) over the branch names and the base ('base': no branch)."""
    from routers.base import make_router
    from routers.table import RoutingTable

    rows = []
    for i, q in enumerate(ARITH * 3 + LISTS * 3 + PLAIN * 3):
        skill = "arith" if q in ARITH else "lists" if q in LISTS else "base"
        rows.append(
            {
                "id": f"q{i}",
                "task": skill,
                "prompt": f"{q} ({i})",
                "scores": {n: float(n == skill) for n in ("arith", "lists", "base")},
                "costs": {"arith": 1.0, "lists": 1.0, "base": 1.0},
            }
        )
    router = make_router("knn", encoder="tfidf", k=3).fit(RoutingTable.from_rows(rows))
    return router.save(ccoe_root / "gate")
