"""The zoo's skills: seeded generators of question/answer pairs and their checkers.

Each skill is a domain a user would recognise and a 135M model can learn on a
CPU in minutes: multi-digit arithmetic, list manipulation, unit conversion.
Training data and held-out benchmark data come from the same generator with
different seeds (``TRAIN_SEED`` vs ``TEST_SEED``), and test questions that also
occur in the training set are dropped, so scores measure generalisation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

TRAIN_SEED = 1234
TEST_SEED = 98765
DEV_SEED = 4242  # router training and merge calibration: disjoint from train and test


@dataclass(frozen=True)
class Example:
    """One question with its reference answer."""

    id: str
    skill: str
    question: str
    answer: str


def _arith(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "sub":
        a, b = rng.randint(100, 999), rng.randint(10, 999)
        return f"What is {a} - {b}?", str(a - b)
    a, b = rng.randint(12, 99), rng.randint(3, 9)
    return f"What is {a} * {b}?", str(a * b)


def _lists(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(4, 6))]
    kind = rng.choice(["sort", "reverse", "max", "sort_desc"])
    shown = ", ".join(map(str, xs))
    if kind == "sort":
        return f"Sort these numbers from smallest to largest: {shown}", ", ".join(map(str, sorted(xs)))
    if kind == "sort_desc":
        return f"Sort these numbers from largest to smallest: {shown}", ", ".join(map(str, sorted(xs, reverse=True)))
    if kind == "reverse":
        return f"Reverse the order of this list: {shown}", ", ".join(map(str, reversed(xs)))
    return f"What is the largest number in this list: {shown}?", str(max(xs))


_UNITS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("L", "mL", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
]


def _units(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_UNITS)
    if rng.random() < 0.5:
        v = rng.randint(2, 999)
        return f"Convert {v} {big} to {small}.", str(v * factor)
    v = rng.randint(2, 999)
    return f"Convert {v * factor} {small} to {big}.", str(v)


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arith": _arith,
    "lists": _lists,
    "units": _units,
}

SKILL_DESCRIPTIONS = {
    "arith": "three-digit addition and subtraction, two-digit by one-digit multiplication",
    "lists": "sorting, reversing and taking the maximum of short lists of numbers",
    "units": "metric and time unit conversion with whole-number results",
}


def generate(skill: str, n: int, seed: int, exclude: set[str] | None = None) -> list[Example]:
    """``n`` distinct examples of ``skill`` from ``seed``, skipping questions in ``exclude``."""
    if skill not in SKILLS:
        raise ValueError(f"skill: expected one of {', '.join(SKILLS)}, found {skill!r}")
    rng = random.Random(f"{skill}:{seed}")
    seen = set(exclude or ())
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"skill {skill!r}: could not draw {n} distinct examples")
        q, a = SKILLS[skill](rng)
        if q in seen:
            continue
        seen.add(q)
        out.append(Example(id=f"{skill}-{seed}-{len(out)}", skill=skill, question=q, answer=a))
    return out


def test_set(skill: str, n: int = 200, train_size: int = 4000) -> list[Example]:
    """The held-out benchmark examples of ``skill``: TEST_SEED, minus any training question."""
    train = {e.question for e in generate(skill, train_size, TRAIN_SEED)}
    return generate(skill, n, TEST_SEED, exclude=train)


def dev_set(skill: str, n: int = 100, train_size: int = 4000, test_size: int = 200) -> list[Example]:
    """Held-out examples for fitting routers or merges: DEV_SEED, minus training and test questions."""
    exclude = {e.question for e in generate(skill, train_size, TRAIN_SEED)}
    exclude |= {e.question for e in test_set(skill, test_size, train_size)}
    return generate(skill, n, DEV_SEED, exclude=exclude)


def mixed_test_set(n_per_skill: int = 100) -> list[Example]:
    """The mixed-domain benchmark: every skill's test examples, interleaved in a fixed order."""
    per = [test_set(s, n_per_skill) for s in SKILLS]
    return [ex for group in zip(*per) for ex in group]


def mixed_dev_set(n_per_skill: int = 100) -> list[Example]:
    """Every skill's dev examples, interleaved: routing data that never overlaps the test sets."""
    per = [dev_set(s, n_per_skill) for s in SKILLS]
    return [ex for group in zip(*per) for ex in group]


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _numbers(text: str) -> list[str]:
    return _NUM.findall(text.replace(",", ", ").replace("\u2212", "-"))


def check(skill: str, output: str, answer: str) -> float:
    """1.0 if ``output`` answers correctly, else 0.0.

    Number answers: the first number in the output must equal the answer
    (a model that lists several candidates is not credited). List answers: the
    first len(answer) numbers of the output must equal the answer's, in order.
    """
    want = _numbers(answer)
    got = _numbers(output)
    if not want:
        return float(output.strip() == answer.strip())
    if len(want) == 1:
        return float(bool(got) and _same_number(got[0], want[0]))
    return float(len(got) >= len(want) and all(_same_number(g, w) for g, w in zip(got, want)))


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b
