from __future__ import annotations

import random
from pathlib import Path

import pytest

from routers.table import RoutingTable

_MATH = ["add", "multiply", "divide", "subtract", "integral", "equation", "sum", "product"]
_HIST = ["emperor", "war", "dynasty", "revolution", "treaty", "kingdom", "battle", "empire"]


def synthetic_rows(n: int = 160, seed: int = 0) -> list[dict]:
    """Two experts: 'mathy' answers math prompts, 'histy' history prompts, with 10% label noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        math = i % 2 == 0
        words = rng.sample(_MATH if math else _HIST, 3)
        prompt = (f"Please {words[0]} the {words[1]} and {words[2]} of {rng.randint(1, 99)}" if math else f"Tell me about the {words[0]} {words[1]} {words[2]} in {rng.choice(['rome', 'china', 'egypt'])}")
        good_m = 1.0 if math else 0.0
        if rng.random() < 0.1:
            good_m = 1.0 - good_m
        rows.append(
            {
                "id": f"q{i}",
                "task": "math" if math else "history",
                "prompt": prompt,
                "scores": {"mathy": good_m, "histy": 1.0 - good_m if rng.random() > 0.2 else good_m},
                "costs": {"mathy": 1.0, "histy": 4.0},
            }
        )
    return rows


@pytest.fixture
def synth_table() -> RoutingTable:
    return RoutingTable.from_rows(synthetic_rows(), source="synthetic")


@pytest.fixture
def synth_path(tmp_path: Path, synth_table: RoutingTable) -> Path:
    p = tmp_path / "table.jsonl"
    synth_table.save(p)
    return p
