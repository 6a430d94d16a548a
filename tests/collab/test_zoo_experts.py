"""Slow: the shipped domain experts load offline and are better than their base at their skill."""

from __future__ import annotations

import json

import pytest

from collab import skills, zoo
from collab.system import GenerationRequest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("skill", list(skills.SKILLS))
def test_domain_expert_beats_base_on_its_skill(skill: str) -> None:
    from collab.experts import Expert

    entry = zoo.get(f"smol-{skill}")
    assert entry.installed, "the shipped adapter is missing"
    info = json.loads((entry.path() / "collab_train.json").read_text())
    assert info["config"]["skill"] == skill and info["config"]["base"] == "zoo:smollm2-135m-instruct"
    examples = skills.test_set(skill, 16)
    reqs = [GenerationRequest.chat(e.question, max_tokens=32) for e in examples]

    def accuracy(expert: Expert) -> float:
        outs = expert.generate_batch(reqs)
        return sum(skills.check(skill, o.text, e.answer) for o, e in zip(outs, examples)) / len(examples)

    tuned = accuracy(Expert.load(f"zoo:smol-{skill}"))
    base = accuracy(Expert.load("zoo:smollm2-135m-instruct"))
    assert tuned >= base + 0.2, (tuned, base)


def test_domain_expert_loads_without_warnings() -> None:
    import warnings

    from collab.experts import Expert

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Expert.load("zoo:smol-arith")
    assert not [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning, UserWarning))]
