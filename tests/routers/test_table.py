from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from routers.table import (
    TableError,
    TableWarning,
    RoutingTable,
    derive_task,
    from_llmrouter,
    from_routellm_gsm8k,
    from_routellm_mmlu,
    load_table,
)
from tests.routers.conftest import synthetic_rows


def _write(tmp_path: Path, rows: list) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_roundtrip(tmp_path: Path, synth_table: RoutingTable) -> None:
    p = tmp_path / "out.jsonl"
    synth_table.save(p)
    back = RoutingTable.load(p)
    assert back.experts == ["mathy", "histy"]
    assert back.ids == synth_table.ids and back.prompts == synth_table.prompts
    np.testing.assert_array_equal(back.scores, synth_table.scores)
    np.testing.assert_array_equal(back.costs, synth_table.costs)
    assert back.content_hash() == synth_table.content_hash()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"scores": {"mathy": 1.0, "histy": 0.0, "other": 1.0}}, "line 2: scores: unknown expert 'other'"),
        ({"prompt": "   "}, "line 2: field 'prompt': expected a non-empty string"),
        ({"scores": {"mathy": float("nan"), "histy": 0.0}}, "line 2: scores.mathy: expected a number in [0, 1], found nan"),
        ({"scores": {"mathy": 1.5, "histy": 0.0}}, "line 2: scores.mathy: expected a number in [0, 1], found 1.5"),
        ({"scores": {"mathy": 1.0}}, "line 2: scores: expert 'histy' is missing"),
        ({"id": "q0"}, "line 2: duplicate query id 'q0' (first at line 1)"),
        ({"costs": {"mathy": -1}}, "line 2: costs.mathy: expected a finite cost >= 0"),
    ],
)
def test_validation_names_line_and_field(tmp_path: Path, bad: dict, message: str) -> None:
    rows = synthetic_rows(4)
    rows[1].update(bad)
    # json.dumps writes NaN as the bare token NaN, which Python's json reads back as nan.
    with pytest.raises(TableError) as e:
        RoutingTable.load(_write(tmp_path, rows))
    assert message in str(e.value)
    assert "t.jsonl" in str(e.value)


def test_invalid_json_line(tmp_path: Path) -> None:
    rows = [json.dumps(r) for r in synthetic_rows(3)]
    rows[2] = rows[2][:-3]
    with pytest.raises(TableError, match="line 3: not valid JSON"):
        RoutingTable.load(_write(tmp_path, rows))


def test_missing_costs_default_to_one_and_say_so(tmp_path: Path) -> None:
    rows = synthetic_rows(6)
    for r in rows:
        del r["costs"]
    with pytest.warns(TableWarning, match="6 of 6 rows give no cost.*default to 1"):
        t = RoutingTable.load(_write(tmp_path, rows))
    assert (t.costs == 1).all()
    assert t.notes and "default to 1" in t.notes[0]


def test_split_is_stratified_seeded_and_disjoint(synth_table: RoutingTable) -> None:
    tr, te = synth_table.split(0.25, seed=3)
    tr2, te2 = synth_table.split(0.25, seed=3)
    assert te.ids == te2.ids
    assert not set(tr.ids) & set(te.ids) and len(tr) + len(te) == len(synth_table)
    assert te.tasks.count("math") == te.tasks.count("history") == 20
    assert synth_table.split(0.25, seed=4)[1].ids != te.ids


def test_folds_and_leave_one_task_out(synth_table: RoutingTable) -> None:
    folds = synth_table.folds(4, seed=0)
    val = np.concatenate([v for _, v in folds])
    assert sorted(val.tolist()) == list(range(len(synth_table)))
    loto = list(synth_table.leave_one_task_out())
    assert [t for t, _, _ in loto] == ["history", "math"]
    for task, tr, te in loto:
        assert set(te.tasks) == {task} and task not in tr.tasks


def test_derive_task() -> None:
    assert derive_task("Q: There are 3 houses in a row, numbered 1 on the left") == "logic_grid"
    assert derive_task('\ndef f(x):\n    """Return x."""\n') == "code"
    assert derive_task("What is the sum of all of the positive even factors of $504$?") == "math"
    assert derive_task("Kendy made 2 transactions. She sent $60 and $30. How much is left of $190?") == "math_word"
    assert derive_task("who plays the main character in jeepers creepers 3?") == "open_qa"
    assert derive_task("Humans grow thinner when they") == "completion"


def test_llmrouter_converter() -> None:
    t = from_llmrouter()
    assert len(t) == 5608 and len(t.experts) == 9
    assert "gemma-2-9b-it" in t.experts
    assert len(set(t.tasks)) >= 5
    assert t.notes and "no costs" in t.notes[0]
    assert 0.6 < t.scores.mean(axis=0).max() < 0.65 and 0.79 < t.scores.max(axis=1).mean() < 0.81
    p = from_llmrouter(costs="params")
    assert p.costs[0, p.experts.index("llama3-chatqa-1.5-70b")] == 70.0


def test_routellm_converters() -> None:
    g = from_routellm_gsm8k()
    assert len(g) == 1319 and g.experts == ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"]
    assert math.isclose(g.scores[:, 1].mean(), 1130 / 1319)
    assert (g.costs[:, 1] > g.costs[:, 0] * 50).all()  # GPT-4 is ~100x Mixtral per token
    m = from_routellm_mmlu()
    assert len(set(m.tasks)) == 57 and len(m) > 14000
    assert load_table("routellm-gsm8k").ids == g.ids
