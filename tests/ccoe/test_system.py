"""``type: ccoe`` in a spec with a router gate, the System contract, evaluation and
serving: a CCoE system works wherever any System does, and its trace names the
branch and the gate's scores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collab.errors import SpecError
from collab.spec import load_spec
from collab.system import GenerationRequest, Scorer
from tests.ccoe.conftest import ARITH, LISTS, PLAIN
from tests.contract import SystemContract


def _spec(root: Path, base_dir: Path, system: dict[str, Any]) -> Path:
    path = root / "spec.yaml"
    experts = {
        "base": {"ref": str(base_dir)},
        "far": {"url": "http://127.0.0.1:9/v1", "model": "m"},
    }
    path.write_text(yaml.safe_dump({"experts": experts, "systems": {"ccoe": system}}))
    return path


def _system(experts: dict[str, Path], router_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "type": "ccoe",
        "base": "base",
        "branches": {n: str(d) for n, d in experts.items()},
        "gate": str(router_dir),
        **extra,
    }


def test_spec_builds_a_router_gated_system(
    tmp_path: Path,
    base_dir: Path,
    experts: dict[str, Path],
    router_dir: Path,
    popped: dict[str, Any],
) -> None:
    from collab.ccoe.system import CCoESystem

    spec = load_spec(_spec(tmp_path, base_dir, _system(experts, router_dir)))
    system = spec.system("ccoe")
    assert (
        isinstance(system, CCoESystem)
        and isinstance(system, Scorer)
        and system.name == "ccoe"
    )
    assert system.base is spec.expert(
        "base"
    )  # the spec's expert is the shared backbone, not a copy
    reqs = [
        GenerationRequest.chat(q, max_tokens=8) for q in (ARITH[0], LISTS[0], PLAIN[0])
    ]
    got = system.generate_batch(reqs)
    assert [c.trace["branch"] for c in got] == ["arith", "lists", "base"]
    for req, c in zip(reqs, got):
        gate = c.trace["gate"]
        assert (
            gate["type"] == "router"
            and gate["router"] == "knn"
            and set(gate["scores"]) == {"arith", "lists", "base"}
        )
        assert max(gate["scores"], key=gate["scores"].get) == c.trace["branch"]
        own = (
            popped[c.trace["branch"]]
            if c.trace["branch"] != "base"
            else spec.expert("base")
        )
        assert c.text == own.generate(req).text
    fixed = load_spec(
        _spec(
            tmp_path, base_dir, _system(experts, router_dir, gate={"branch": "lists"})
        )
    ).system("ccoe")
    c = fixed.generate(reqs[0])
    assert (
        c.trace["branch"] == "lists"
        and c.trace["depth"] == 3
        and c.text == popped["lists"].generate(reqs[0]).text
    )


def test_relative_paths_are_relative_to_the_spec(
    tmp_path: Path, base_dir: Path, experts: dict[str, Path], router_dir: Path
) -> None:
    import shutil

    for n, d in experts.items():
        shutil.copytree(d, tmp_path / "artefacts" / n)
    shutil.copytree(router_dir, tmp_path / "artefacts" / "gate")
    system = {
        "type": "ccoe",
        "base": "base",
        "branches": {"arith": "artefacts/arith", "lists": "artefacts/lists"},
        "gate": "artefacts/gate",
    }
    built = load_spec(_spec(tmp_path, base_dir, system)).system("ccoe")
    assert set(built.ccoe.branches) == {"arith", "lists"}


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"router": "x"}, "systems.ccoe.router", "unknown key for type 'ccoe'"),
        ({"base": "nope"}, "systems.ccoe.base", "unknown expert 'nope'"),
        ({"base": "far"}, "systems.ccoe.base", "remote endpoint"),
        (
            {"branches": []},
            "systems.ccoe.branches",
            "expected a mapping of branch name",
        ),
        (
            {"branches": {"arith": "missing"}},
            "systems.ccoe.branches.arith",
            "directory 'missing' not found",
        ),
        (
            {"branches": {"base": "ARITH"}},
            "systems.ccoe.branches.base",
            "is the base's name",
        ),
        (
            {"branches": {"arith": "ROUTER"}},
            "systems.ccoe.branches.arith",
            "type: expected 'ccoe'",
        ),
        ({"gate": "missing"}, "systems.ccoe.gate", "router directory not found"),
        (
            {"gate": {"branch": "units"}},
            "systems.ccoe.gate",
            "NAME one of arith, lists, base",
        ),
        ({"gate": 3}, "systems.ccoe.gate", "expected a router directory"),
        (
            {"branches": {"arith": "ARITH"}},
            "systems.ccoe.gate",
            "trained on expert 'lists', which is neither a branch",
        ),
    ],
)
def test_spec_errors_name_the_file_and_key(
    tmp_path: Path,
    base_dir: Path,
    experts: dict[str, Path],
    router_dir: Path,
    change: dict[str, Any],
    key: str,
    message: str,
) -> None:
    values = {"ARITH": str(experts["arith"]), "ROUTER": str(router_dir)}
    if isinstance(change.get("branches"), dict):
        change = {
            "branches": {k: values.get(v, v) for k, v in change["branches"].items()}
        }
    with pytest.raises(SpecError, match=rf"spec.yaml: {key}: .*{message}"):
        load_spec(_spec(tmp_path, base_dir, {**_system(experts, router_dir), **change}))


def test_spec_refuses_an_expert_of_another_base(
    tmp_path: Path, other_base_dir: Path, experts: dict[str, Path], router_dir: Path
) -> None:
    spec = load_spec(
        _spec(tmp_path, other_base_dir, _system(experts, router_dir))
    )  # config.json alone cannot tell
    with pytest.raises(SpecError, match=r"systems.ccoe: .*trained on another backbone"):
        spec.system("ccoe")


def test_a_one_branch_system_needs_no_gate(
    tmp_path: Path, base_dir: Path, experts: dict[str, Path], popped: dict[str, Any]
) -> None:
    system = load_spec(
        _spec(
            tmp_path,
            base_dir,
            {
                "type": "ccoe",
                "base": "base",
                "branches": {"arith": str(experts["arith"])},
            },
        )
    ).system("ccoe")
    req = GenerationRequest.chat(LISTS[0], max_tokens=6)
    assert system.generate(req).text == popped["arith"].generate(req).text


class TestCCoEContract(SystemContract):
    @pytest.fixture
    def system(self, base: Any, experts: dict[str, Path], router_dir: Path) -> Any:
        from collab.ccoe.system import CCoESystem

        return CCoESystem.load(base, experts, router_dir, name="ccoe")


def test_collab_eval_scores_generation_and_multiple_choice(
    tmp_path: Path, base: Any, experts: dict[str, Path], router_dir: Path
) -> None:
    from collab.ccoe.system import CCoESystem
    from evals.benchmarks.base import Example, MultipleChoiceBenchmark
    from evals.runner import evaluate

    system = CCoESystem.load(base, experts, router_dir, name="ccoe")
    gen = evaluate(
        system,
        "skill:mixed",
        limit=3,
        out_dir=tmp_path / "gen",
        progress=False,
        max_tokens=6,
    )
    assert gen.mode == "generate" and gen.n == 3
    traces = [
        json.loads(x)["trace"]
        for x in (tmp_path / "gen" / "results.jsonl").read_text().splitlines()
    ]
    assert all(
        t["type"] == "ccoe"
        and t["branch"] in ("arith", "lists", "base")
        and t["gate"]["scores"]
        for t in traces
    )

    class Tiny(MultipleChoiceBenchmark):
        name = "tiny-mc"

        def load_examples(self) -> list[Example]:
            return [
                Example(
                    id=f"q{a}",
                    question=f"What is {a} + {a}?",
                    gold=a % 3,
                    choices=[str(2 * a), str(a), str(a + 1)],
                )
                for a in range(3)
            ]

        def context(self, example: Example) -> str:
            return f"Question: {example.question}\nAnswer:"

    res = evaluate(system, Tiny(), out_dir=tmp_path / "mc", progress=False)
    assert res.mode == "loglikelihood" and res.n == 3
    rows = [
        json.loads(x)
        for x in (tmp_path / "mc" / "results.jsonl").read_text().splitlines()
    ]
    for r, ex in zip(rows, Tiny().examples()):
        assert r["detail"]["loglikelihoods"] == pytest.approx(
            [round(x, 4) for x, _ in system.loglikelihood_batch(Tiny().pairs(ex))],
            abs=2e-4,
        )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    base_dir: Path,
    experts: dict[str, Path],
    router_dir: Path,
) -> Iterator[Any]:
    from collab.server import CollabServer, ServeOptions, create_app
    from tests.server.helpers import Running

    spec = load_spec(
        _spec(
            tmp_path_factory.mktemp("serve-ccoe"),
            base_dir,
            _system(experts, router_dir),
        )
    )
    server = CollabServer.from_spec(spec, ServeOptions(max_wait_ms=20))
    server.load()
    with Running(create_app(server)) as running:
        yield running, spec
    server.close()


def test_the_openai_client_gets_the_answer_and_the_trace(served: Any) -> None:
    import openai

    running, spec = served
    client = openai.OpenAI(
        base_url=running.url, api_key="none", max_retries=0, timeout=60
    )
    msgs = [{"role": "user", "content": LISTS[1]}]
    want = spec.system("ccoe").generate(GenerationRequest.chat(LISTS[1], max_tokens=10))
    r = client.chat.completions.create(model="ccoe", messages=msgs, max_tokens=10)
    assert r.choices[0].message.content == want.text
    trace = r.model_extra["collab"]
    assert (
        trace["type"] == "ccoe"
        and trace["branch"] == "lists" == want.trace["branch"]
        and trace["gate"]["scores"] == want.trace["gate"]["scores"]
    )
    chunks = list(
        client.chat.completions.create(
            model="ccoe", messages=msgs, max_tokens=10, stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == want.text
    )
