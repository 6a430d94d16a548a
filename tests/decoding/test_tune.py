"""Tuning eta: thresholds at quantiles of the deferral rate, the curve, the choice of
the best point, the written files and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from collab.system import GenerationRequest
from decoding.system import CoLLMDecoder
from decoding.tune import (
    CurvePoint,
    ValidationItem,
    choose,
    thresholds_for_rates,
    tune_threshold,
    validation_set,
    write_curve,
)
from tests.decoding.conftest import random_head, write_head


def test_thresholds_sit_at_quantiles_of_the_deferral_probabilities() -> None:
    g = [0.05, 0.1, 0.1, 0.3, 0.5, 0.55, 0.7, 0.8, 0.9, 0.95]
    rates = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    etas = thresholds_for_rates(g, rates)
    assert etas[0] == 1.0 and etas[-1] == 0.0
    for r, eta in zip(rates[1:-1], etas[1:-1]):
        above = sum(x > eta for x in g) / len(g)
        assert above <= r  # at most the target share defers ...
        lower = [x for x in g if x < eta]
        if lower:  # ... and the next lower candidate would exceed it
            assert sum(x > max(lower) for x in g) / len(g) > r
    assert etas[1:-1] == [0.9, 0.8, 0.5, 0.1]


def test_dev_splits_are_disjoint_from_training_and_test(tmp_path: Path) -> None:
    from collab import skills

    items = validation_set("dev:arith", 20)
    questions = {it.request.messages[0]["content"] for it in items}
    assert len(items) == 20
    assert not questions & {e.question for e in skills.generate("arith", 4000, skills.TRAIN_SEED)}
    assert not questions & {e.question for e in skills.test_set("arith")}
    ex = skills.dev_set("arith", 1)[0]
    assert items[0].score(f"{ex.answer} is it") == 1.0 and items[0].score("no idea") == 0.0
    with pytest.raises(Exception, match="unknown skill"):
        validation_set("dev:poetry")


def _items(expert: Any, prompts: list[str]) -> list[ValidationItem]:
    """Questions whose only right answer is what ``expert`` answers greedily."""
    out = []
    for i, p in enumerate(prompts):
        req = GenerationRequest.chat(p, max_tokens=12)
        want = expert.generate(req).text
        out.append(ValidationItem(str(i), req, lambda text, want=want: float(text == want)))
    return out


PROMPTS = ["What is 2 + 2?", "The capital of France is", "Convert 3 km to m.", "What is 12 * 3?", "Reverse the list [1, 2, 3]."]


def test_tuning_picks_the_threshold_with_the_best_accuracy(tiny_expert: Any, assistants: list[Any]) -> None:
    d = CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, seed=1, scale=0.3), threshold=0.5)
    # right answers are the assistant's: only always deferring gets them all
    res = tune_threshold(d, _items(assistants[0], PROMPTS), rates=[0.0, 0.3, 0.6, 1.0])
    assert [p.target_rate for p in res.points] == [0.0, 0.3, 0.6, 1.0]
    assert res.points[0].threshold == 1.0 and res.points[0].deferral_rate == 0.0
    assert res.points[-1].threshold == 0.0 and res.points[-1].deferral_rate == 1.0 and res.points[-1].accuracy == 1.0
    assert res.best.threshold == 0.0 and d.threshold == 0.0
    # right answers are the base's: never deferring wins
    res = tune_threshold(d, _items(tiny_expert, PROMPTS), rates=[0.0, 0.3, 0.6, 1.0])
    assert res.best.threshold == 1.0 and res.best.accuracy == 1.0 and res.points[-1].accuracy < 1.0
    assert all(p.tokens == sum(p.tokens_by_expert.values()) for p in res.points)


def test_ties_go_to_the_lower_deferral_rate(tiny_expert: Any, assistants: list[Any]) -> None:
    d = CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, seed=1, scale=0.3), threshold=0.5)
    items = [ValidationItem(str(i), GenerationRequest.chat(p, max_tokens=8), lambda text: 1.0) for i, p in enumerate(PROMPTS)]
    res = tune_threshold(d, items, rates=[1.0, 0.5, 0.0])
    assert res.best.deferral_rate == 0.0 and res.best.threshold == 1.0


def test_cheapest_is_the_lowest_deferral_rate_within_the_best_interval() -> None:
    def pt(rate: float, acc: float, lo: float) -> CurvePoint:
        return CurvePoint(rate, 1 - rate, acc, lo, min(1.0, acc + 0.1), rate, 10)

    curve = [pt(0.0, 0.05, 0.0), pt(0.12, 0.32, 0.2), pt(0.35, 0.33, 0.22), pt(0.76, 0.42, 0.30), pt(1.0, 0.40, 0.28)]
    best, cheapest = choose(curve)
    assert best.deferral_rate == 0.76
    assert cheapest.deferral_rate == 0.12  # 0.32 >= 0.30, the best's lower end; 0.05 is not
    assert choose([pt(0.2, 0.5, 0.4), pt(0.5, 0.5, 0.4)])[0].deferral_rate == 0.2  # accuracy ties: the lower rate


def test_curve_files(tmp_path: Path, tiny_expert: Any, assistants: list[Any]) -> None:
    d = CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, seed=1, scale=0.3), threshold=0.5)
    res = tune_threshold(d, _items(assistants[0], PROMPTS[:3]), rates=[0.0, 0.5, 1.0])
    json_path, png_path = write_curve(res, tmp_path / "tune")
    data = json.loads(json_path.read_text())
    assert [p["target_rate"] for p in data["points"]] == [0.0, 0.5, 1.0] and data["best"]["threshold"] == res.best.threshold
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_tunes_a_head(tmp_path: Path, tiny_expert: Any, assistants: list[Any]) -> None:
    import typer
    from typer.testing import CliRunner

    from decoding.cli import register

    head = write_head(tmp_path / "head", random_head(1, seed=1, scale=0.3), tiny_expert, assistants[:1])
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    res = CliRunner().invoke(app, ["decode", "tune", "--head", str(head), "--data", "dev:arith", "--limit", "3", "--rates", "0,0.5,1", "--pick", "cheapest", "--out", str(tmp_path / "t"), "-q"])
    assert res.exit_code == 0, res.output
    assert "best: threshold" in res.output and "cheapest: threshold" in res.output and (tmp_path / "t" / "curve.png").is_file()
    rows = json.loads((tmp_path / "t" / "curve.json").read_text())["points"]
    assert [r["target_rate"] for r in rows] == [0.0, 0.5, 1.0] and rows[-1]["deferral_rate"] == 1.0
    saved = json.loads((tmp_path / "t" / "curve.json").read_text())
    assert saved["pick"] == "cheapest" and saved["chosen"] == saved["cheapest"]
