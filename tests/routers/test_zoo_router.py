"""The shipped zoo router (examples/zoo.yaml, system ``auto``) routes the 150
``skill:mixed`` questions that docs/benchmarks.md reports exactly as it did
before the decoding loop and the one routing path ([W2 1/8]): the decisions in
``data/zoo-router-mixed150.json`` were computed with the commit before that
work (3d60a31) and agree with today's code one for one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from collab.spec import load_spec
from collab.system import GenerationRequest
from evals.benchmarks.skills import mixed

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = json.loads((Path(__file__).parent / "data" / "zoo-router-mixed150.json").read_text())


def test_zoo_router_decisions_on_mixed_are_unchanged() -> None:
    bench = mixed()
    examples = bench.load_examples()[:150]
    auto = load_spec(ROOT / "examples" / "zoo.yaml").system("auto")
    requests = [GenerationRequest(messages=bench.messages(e), max_tokens=32) for e in examples]
    got = {e.id: auto.expert_names[d.ranking[0]] for e, (d, _) in zip(examples, auto.route(requests))}
    assert list(got) == list(EXPECTED)
    changed = {i: (EXPECTED[i], got[i]) for i in got if got[i] != EXPECTED[i]}
    assert not changed, f"{len(changed)} of 150 decisions changed (expected, now): {dict(list(changed.items())[:5])}"
    # what docs/benchmarks.md reports: every arith and lists question to its expert, 47 of 50 unit conversions
    assert Counter(got.values()) == {"arith": 50, "lists": 50, "units": 47, "smol": 3}
