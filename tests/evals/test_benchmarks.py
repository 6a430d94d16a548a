from __future__ import annotations

import pytest

from collab.errors import CollabError
from evals.benchmarks import Benchmark, Example, Scored, benchmark_names, get_benchmark, register_benchmark
from evals.benchmarks.base import parse_letter
from evals.benchmarks.gsm8k import extract_last_number, gold_answer
from evals.benchmarks.humaneval import build_program, extract_code


def test_registry_has_required_benchmarks() -> None:
    names = benchmark_names()
    for n in ("gsm8k", "humaneval", "arc_easy", "arc_challenge", "mmlu", "hellaswag", "piqa", "boolq", "mmlu:astronomy"):
        assert n in names
    assert sum(n.startswith("mmlu:") for n in names) == 57


def test_unknown_benchmark_lists_known_names() -> None:
    with pytest.raises(CollabError) as e:
        get_benchmark("gsm9k")
    msg = str(e.value)
    assert "unknown benchmark 'gsm9k'" in msg and "gsm8k" in msg and "arc_easy" in msg and "mmlu:<subject>" in msg


def test_fixed_order_and_sizes() -> None:
    arc = get_benchmark("arc_easy")
    assert len(arc.examples()) == 570
    assert [e.id for e in arc.examples(3)] == [e.id for e in arc.examples()[:3]]
    assert arc.examples(1)[0].id == "MCAS_2000_4_6"
    gsm = get_benchmark("gsm8k")
    assert len(gsm.examples()) == 1319
    assert gsm.examples(1)[0].gold == "18"
    assert len(get_benchmark("humaneval").examples()) == 164
    assert len(get_benchmark("mmlu:astronomy").examples()) == 152
    # The overall MMLU interleaves subjects, so a small limit spans many of them.
    first = get_benchmark("mmlu").examples(10)
    assert len({e.meta["group"] for e in first}) == 10


def test_arc_prompt_matches_lm_eval_format() -> None:
    arc = get_benchmark("arc_easy")
    ex = arc.examples(1)[0]
    assert arc.pairs(ex)[0] == ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone")
    assert ex.gold == 0
    mmlu = get_benchmark("mmlu:astronomy")
    m = mmlu.examples(1)[0]
    ctx, cont = mmlu.pairs(m)[1]
    assert ctx.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert ctx.endswith("\nD. " + m.choices[3] + "\nAnswer:") and cont == " B"


def test_hellaswag_preprocessing() -> None:
    h = get_benchmark("hellaswag")
    ex = h.examples(1)[0]
    assert h.context(ex) == "Roof shingle removal: A man is sitting on a roof. He"
    assert ex.gold == 3 and len(ex.choices) == 4


@pytest.mark.parametrize(
    "output,expected",
    [("so 16-3-4=9 and 9*2 = 18. The answer is 18.", "18"), ("The answer is $1,234.", "1234"), ("-5 degrees", "-5"), ("no number", None), ("3.50 dollars", "3.5")],
)
def test_gsm8k_extraction(output: str, expected: str | None) -> None:
    assert extract_last_number(output) == expected


def test_gsm8k_scoring() -> None:
    gsm = get_benchmark("gsm8k")
    ex = gsm.examples(1)[0]
    assert gold_answer("blah\n#### 1,000") == "1000"
    assert gsm.score(ex, "She makes 9 * 2 = $18 every day. The answer is 18.").score == 1.0
    assert gsm.score(ex, "The answer is 17.").score == 0.0
    assert gsm.score(ex, "").score == 0.0
    msgs = gsm.request(ex).messages
    assert msgs[0]["role"] == "user" and msgs[0]["content"].endswith(ex.question)


def test_multiple_choice_scoring_acc_and_acc_norm() -> None:
    arc = get_benchmark("arc_easy")
    ex = arc.examples(1)[0]  # choices: cellular telephone (18 chars), television, refrigerator, airplane; gold 0
    s = arc.score_loglikelihoods(ex, [-20.0, -19.0, -30.0, -25.0])
    assert s.metrics == {"acc": 0.0, "acc_norm": 1.0}  # -20/18 beats -19/10 per character
    s = arc.score_loglikelihoods(ex, [-5.0, -19.0, -30.0, -25.0])
    assert s.metrics == {"acc": 1.0, "acc_norm": 1.0} and s.score == 1.0
    with pytest.raises(ValueError):
        arc.score_loglikelihoods(ex, [-1.0])


def test_letter_generation_fallback() -> None:
    arc = get_benchmark("arc_easy")
    ex = arc.examples(1)[0]
    content = arc.request(ex).messages[0]["content"]
    assert "A. cellular telephone" in content and "(A, B, C, D)" in content
    assert parse_letter("B", 4) == 1
    assert parse_letter("The answer is (C).", 4) == 2
    assert parse_letter("Answer: a", 4) == 0
    assert parse_letter("E", 4) is None
    assert arc.score(ex, "A. cellular telephone").score == 1.0
    assert arc.score(ex, "D").score == 0.0


def test_humaneval_program_building() -> None:
    he = get_benchmark("humaneval")
    ex = he.examples(1)[0]
    body = ex.meta["canonical_solution"]
    whole = ex.question + body
    assert "return" in build_program(ex.question, body, ex.gold["test"], "has_close_elements")
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```python\nx = 1\n") == "x = 1\n"  # unclosed fence
    # A fenced whole function and a bare body both pass with the canonical solution.
    assert he.score(ex, f"```python\n{whole}```").score == 1.0
    assert he.score(ex, body).score == 1.0
    assert he.score(ex, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```").score == 0.0


class _Echo(Benchmark):
    name = "test:echo"
    metric_names = ("exact_match",)

    def load_examples(self) -> list[Example]:
        return [Example(id=str(i), question=f"say {i}", gold=str(i)) for i in range(3)]

    def messages(self, example: Example) -> list[dict[str, str]]:
        return [{"role": "user", "content": example.question}]

    def score(self, example: Example, output: str) -> Scored:
        v = float(output.strip() == example.gold)
        return Scored(v, {"exact_match": v})


def test_register_benchmark_hook() -> None:
    register_benchmark("test:echo", _Echo, replace=True)
    assert "test:echo" in benchmark_names()
    assert get_benchmark("test:echo").examples(2)[1].question == "say 1"
    with pytest.raises(ValueError):
        register_benchmark("test:echo", _Echo)
    with pytest.raises(ValueError):
        register_benchmark("Bad Name", _Echo)


def test_skill_benchmarks_register_through_entry_points() -> None:
    names = benchmark_names()
    if "skill:arith" not in names:
        pytest.skip("zoo skill benchmarks not installed")
    assert len(get_benchmark("skill:arith").examples(5)) == 5
