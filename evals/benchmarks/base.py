"""What a benchmark is: a fixed, ordered list of examples, the prompt each one
becomes, and a scorer. Nothing here imports torch.

Two kinds:

- ``Benchmark`` (generation): each example becomes a ``GenerationRequest``
  (chat messages; an Expert without a chat template renders them in collab's
  plain format) and its output is scored by ``score(example, output)``.
- ``MultipleChoiceBenchmark``: each example also becomes one ``(context,
  continuation)`` pair per choice, scored by log-likelihood as
  lm-evaluation-harness does (``acc`` and length-normalised ``acc_norm``); a
  system that cannot score text answers a lettered question by generation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from collab.system import GenerationRequest

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Example:
    """One benchmark item. ``question`` is the text a router sees (the user's
    question, without instructions or few-shot context); ``gold`` is the answer
    the scorer compares against (a number, an index, test code, ...)."""

    id: str
    question: str
    gold: Any
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scored:
    """The score of one example (in [0, 1]), further metrics, and what the scorer saw."""

    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


class Benchmark:
    """A generation benchmark. Subclasses set ``name`` and implement
    ``load_examples``, ``messages`` and ``score``; the runner does the rest.

    ``examples()`` is cached and its order never changes, so ``limit=N`` always
    takes the same N examples (the first N, as lm-eval's ``--limit`` does).
    """

    name: str = "benchmark"
    description: str = ""
    #: Metric names ``score`` reports; the first is the headline ``score``.
    metric_names: tuple[str, ...] = ("score",)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    source: str = ""

    def __init__(self) -> None:
        self._examples: list[Example] | None = None

    # ------------------------------------------------------------------ data
    def load_examples(self) -> list[Example]:  # pragma: no cover - abstract
        raise NotImplementedError

    def examples(self, limit: int | None = None) -> list[Example]:
        if self._examples is None:
            self._examples = self.load_examples()
            ids = [e.id for e in self._examples]
            if len(set(ids)) != len(ids):
                raise ValueError(f"benchmark {self.name}: example ids are not unique")
        return self._examples if limit is None else self._examples[:limit]

    # ---------------------------------------------------------------- prompts
    def messages(self, example: Example) -> list[dict[str, str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def request(self, example: Example, max_tokens: int | None = None) -> GenerationRequest:
        """The greedy chat request for ``example``."""
        return GenerationRequest(
            messages=self.messages(example),
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            temperature=0.0,
            stop=list(self.stop),
        )

    # ---------------------------------------------------------------- scoring
    def score(self, example: Example, output: str) -> Scored:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def multiple_choice(self) -> bool:
        return False

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source, "kind": "generate"}


class MultipleChoiceBenchmark(Benchmark):
    """Multiple choice, scored like lm-evaluation-harness: for each choice the
    summed log-probability of ``target_delimiter + choice`` after ``context``;
    ``acc`` picks the highest, ``acc_norm`` the highest per character of the
    continuation. ``score`` (generation) reads the first choice letter."""

    metric_names = ("acc", "acc_norm")
    max_tokens = 8
    target_delimiter = " "
    #: Which metric is the headline score of a log-likelihood run.
    primary = "acc"

    def context(self, example: Example) -> str:  # pragma: no cover - abstract
        """The text before each choice, e.g. ``"Question: ...\\nAnswer:"``."""
        raise NotImplementedError

    def continuations(self, example: Example) -> list[str]:
        assert example.choices is not None
        return [self.target_delimiter + c for c in example.choices]

    def pairs(self, example: Example) -> list[tuple[str, str]]:
        ctx = self.context(example)
        return [(ctx, cont) for cont in self.continuations(example)]

    def score_loglikelihoods(self, example: Example, lls: Sequence[float]) -> Scored:
        conts = self.continuations(example)
        if len(lls) != len(conts):
            raise ValueError(f"{self.name}/{example.id}: {len(lls)} log-likelihoods for {len(conts)} choices")
        gold = int(example.gold)
        pred = _argmax(lls)
        # lm-eval normalises by the choice's length in characters (without the delimiter).
        lengths = [len(c) - len(self.target_delimiter) if c.startswith(self.target_delimiter) else len(c) for c in conts]
        pred_norm = _argmax([ll / max(1, n) for ll, n in zip(lls, lengths)])
        acc, acc_norm = float(pred == gold), float(pred_norm == gold)
        metrics = {"acc": acc, "acc_norm": acc_norm}
        return Scored(score=metrics[self.primary], metrics=metrics, detail={"pred": pred, "pred_norm": pred_norm, "gold": gold, "loglikelihoods": [round(x, 4) for x in lls]})

    # ------------------------------------------------------ generation fallback
    def messages(self, example: Example) -> list[dict[str, str]]:
        assert example.choices is not None
        lines = [self.question_for_letters(example).strip()]
        letters = ", ".join(LETTERS[: len(example.choices)])
        lines.append(f"Answer with the letter of the correct choice ({letters}) only.")
        return [{"role": "user", "content": "\n".join(lines)}]

    def question_for_letters(self, example: Example) -> str:
        """The question with its lettered choices (``example.question`` by default)."""
        return example.question

    def score(self, example: Example, output: str) -> Scored:
        assert example.choices is not None
        pred = parse_letter(output, len(example.choices))
        acc = float(pred == int(example.gold))
        return Scored(score=acc, metrics={"acc": acc, "acc_norm": acc}, detail={"pred": pred, "gold": int(example.gold)})

    @property
    def multiple_choice(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kind": "multiple_choice"}


def _argmax(xs: Sequence[float]) -> int:
    best, best_i = -math.inf, 0
    for i, x in enumerate(xs):
        if x > best:
            best, best_i = x, i
    return best_i


_LETTER_RE = re.compile(r"(?:^|[^A-Za-z])([A-Z])(?:$|[^A-Za-z])")


def parse_letter(output: str, n_choices: int) -> int | None:
    """The index of the first standalone choice letter in ``output`` ("B", "(B)",
    "B.", "Answer: B"), or None."""
    valid = LETTERS[:n_choices]
    text = output.strip()
    m = re.search(r"answer\s*(?:is)?\s*[:\-]?\s*\(?([A-Z])\b", text, re.IGNORECASE)
    if m and m.group(1).upper() in valid:
        return valid.index(m.group(1).upper())
    for m in _LETTER_RE.finditer(text):
        if m.group(1) in valid:
            return valid.index(m.group(1))
    return None
