"""GSM8K: grade-school math word problems, scored by final-number exact match.

Data: the 1,319-problem test split in ``evals/data/gsm8k/test.jsonl`` (MIT, see
the LICENSE.txt beside it). The gold answer is the number after ``####``; the
prediction is the last number in the output (commas and a trailing ``.``
removed), so "The answer is 1,234." scores against "1234".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from collab.errors import CollabError
from evals.benchmarks.base import Benchmark, Example, Scored

DATA = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test.jsonl"

INSTRUCTION = (
    "Solve the following math problem. Think step by step, then write the final answer "
    "on the last line as 'The answer is N.' where N is a number.\n\n"
)

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$18' -> '18', '-3.' -> '-3'; None if not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if value == int(value):
        return str(int(value))
    return repr(value)


def extract_last_number(output: str) -> str | None:
    """The last number written in ``output``, normalised, or None."""
    found = _NUMBER.findall(output)
    for candidate in reversed(found):
        n = normalize_number(candidate)
        if n is not None:
            return n
    return None


def gold_answer(answer: str) -> str:
    """The normalised number after '####' in a GSM8K answer field."""
    if "####" not in answer:
        raise ValueError(f"gsm8k answer has no '####': {answer[-80:]!r}")
    n = normalize_number(answer.split("####")[-1])
    if n is None:
        raise ValueError(f"gsm8k gold after '####' is not a number: {answer.split('####')[-1]!r}")
    return n


class GSM8KBenchmark(Benchmark):
    """GSM8K test split, zero-shot chat prompt asking for step-by-step work and a final 'The answer is N.'."""

    name = "gsm8k"
    description = "Grade-school math (test split, 1,319), final-number exact match"
    source = "evals/data/gsm8k/test.jsonl (MIT, OpenAI grade-school-math via RouteLLM)"
    metric_names = ("exact_match",)
    max_tokens = 256
    stop = ("\n\nQuestion:", "\n\nProblem:")

    def __init__(self, path: str | Path = DATA) -> None:
        super().__init__()
        self.path = Path(path)

    def load_examples(self) -> list[Example]:
        if not self.path.is_file():
            raise CollabError(f"{self.path}: gsm8k data not found (expected the test split as JSONL)")
        out: list[Example] = []
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out.append(Example(id=f"test-{i:04d}", question=row["question"], gold=gold_answer(row["answer"])))
                except (json.JSONDecodeError, KeyError, ValueError) as e:
                    raise CollabError(f"{self.path}:{i + 1}: expected {{'question', 'answer' with '####'}}: {e}") from e
        return out

    def messages(self, example: Example) -> list[dict[str, str]]:
        return [{"role": "user", "content": INSTRUCTION + example.question.strip()}]

    def score(self, example: Example, output: str) -> Scored:
        pred = extract_last_number(output)
        em = float(pred is not None and pred == example.gold)
        return Scored(score=em, metrics={"exact_match": em}, detail={"pred": pred, "gold": example.gold})
