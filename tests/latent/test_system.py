"""``type: latent`` in a spec, the System contract, evaluation and serving: a
mixture trained by ``train_latent`` works wherever any System does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from collab.errors import SpecError
from collab.spec import load_spec
from collab.system import GenerationRequest, Scorer
from tests.contract import SystemContract
from tests.latent.conftest import make_mixture

SMALL = dict(encoder="ngram", stacks=2, latent_dim=16, heads=2, router_hidden=16, steps=4, batch_size=4, examples=8, lr=5e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mot_experts: list[Any], data_file: Path) -> Path:
    from collab.latent.train import LatentTrainConfig, train_latent

    return train_latent(mot_experts[:2], str(data_file), tmp_path_factory.mktemp("mot") / "mot", LatentTrainConfig(**SMALL))


def _spec(root: Path, mot_dirs: list[Path], system: dict[str, Any], remote: bool = False) -> Path:
    experts: dict[str, Any] = {"llama": {"ref": str(mot_dirs[0])}, "qwen": {"ref": str(mot_dirs[1])}, "llama2": {"ref": str(mot_dirs[2])}}
    if remote:
        experts["far"] = {"url": "http://127.0.0.1:9/v1", "model": "m"}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump({"experts": experts, "systems": {"mot": system}}))
    return path


def test_spec_builds_the_trained_mixture(tmp_path: Path, trained: Path, mot_dirs: list[Path], mot_experts: list[Any]) -> None:
    from collab.latent.system import MixtureOfThoughts

    spec = load_spec(_spec(tmp_path, mot_dirs, {"type": "latent", "checkpoint": str(trained), "experts": ["llama", "qwen"]}))
    mix = spec.system("mot")
    assert isinstance(mix, MixtureOfThoughts) and isinstance(mix, Scorer) and mix.name == "mot"
    assert [e.name for e in mix.experts] == ["llama", "qwen"] and mix.top_k == 2
    python = MixtureOfThoughts.load(trained, mot_experts[:2], name="mot")
    req = GenerationRequest.chat("What is 3 + 3?", max_tokens=8)
    assert mix.generate(req).text == python.generate(req).text
    k1 = load_spec(_spec(tmp_path, mot_dirs, {"type": "latent", "checkpoint": str(trained), "experts": ["llama", "qwen"], "top_k": 1})).system("mot")
    c = k1.generate(req)
    assert c.trace["experts"] == [c.trace["primary"]] and c.text == {"llama": mot_experts[0], "qwen": mot_experts[1]}[c.trace["primary"]].generate(req).text


@pytest.mark.parametrize(
    ("system", "key", "message"),
    [
        ({"experts": ["llama", "qwen"], "head": "x"}, "systems.mot.head", "unknown key for type 'latent'"),
        ({"experts": "llama"}, "systems.mot.experts", "expected a list of at least two expert names"),
        ({"experts": ["llama", "llama"]}, "systems.mot.experts", "an expert is listed twice"),
        ({"experts": ["llama", "nope"]}, r"systems.mot.experts\[1\]", "unknown expert 'nope'"),
        ({"experts": ["llama", "far"]}, r"systems.mot.experts\[1\]", "remote endpoint"),
        ({"experts": ["llama", "qwen"], "checkpoint": "missing"}, "systems.mot.checkpoint", "directory 'missing' not found"),
        ({"experts": ["llama", "qwen", "llama2"]}, "systems.mot.experts", "trained with 2 experts"),
        ({"experts": ["llama", "qwen"], "top_k": 3}, "systems.mot.top_k", "expected an integer from 1 to 2"),
        ({"experts": ["llama", "qwen"], "top_k": True}, "systems.mot.top_k", "expected an integer from 1 to 2"),
    ],
)
def test_spec_errors_name_the_file_and_key(tmp_path: Path, trained: Path, mot_dirs: list[Path], system: dict[str, Any], key: str, message: str) -> None:
    cfg = {"type": "latent", "checkpoint": str(trained), **system}
    with pytest.raises(SpecError, match=rf"spec.yaml: {key}: .*{message}"):
        load_spec(_spec(tmp_path, mot_dirs, cfg, remote=True))


def test_spec_refuses_a_directory_that_is_not_a_mixture(tmp_path: Path, mot_dirs: list[Path]) -> None:
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "config.json").write_text(json.dumps({"type": "colm-head", "version": 1}))
    with pytest.raises(SpecError, match=r"systems.mot.checkpoint: .*type: expected 'mot'"):
        load_spec(_spec(tmp_path, mot_dirs, {"type": "latent", "checkpoint": "head", "experts": ["llama", "qwen"]}))


def test_spec_refuses_zoo_experts_other_than_the_trained_ones(tmp_path: Path, trained: Path) -> None:
    import shutil

    ckpt = tmp_path / "mot"
    shutil.copytree(trained, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["experts"][0]["ref"], cfg["experts"][1]["ref"] = "zoo:smollm2-135m-instruct", "zoo:gemma3-270m"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "experts": {"smol": {"ref": "zoo:smol-arith"}, "gemma": {"ref": "zoo:gemma3-270m"}},
        "systems": {"mot": {"type": "latent", "checkpoint": "mot", "experts": ["smol", "gemma"]}},
    }))
    with pytest.raises(SpecError, match=r"systems.mot.experts\[0\]: expert 'smol' is zoo:smol-arith, but the checkpoint 'mot' was trained with zoo:smollm2-135m-instruct"):
        load_spec(tmp_path / "spec.yaml")


class TestMixtureContract(SystemContract):
    @pytest.fixture
    def system(self, mot_experts: list[Any]) -> Any:
        return make_mixture(mot_experts, gate=1.0, top_k=2, seed=4)


def test_generate_batch_equals_generate(mot_experts: list[Any]) -> None:
    mix = make_mixture(mot_experts, gate=1.0, top_k=3, seed=6)
    reqs = [GenerationRequest.chat(p, max_tokens=8) for p in ("What is 2 + 2?", "Reverse [1, 2].", "Hello there!", "Convert 3 km to m.")]
    batch = mix.generate_batch(reqs)
    for r, c in zip(reqs, batch):
        one = mix.generate(r)
        assert c.text == one.text and c.trace == one.trace


def test_collab_eval_scores_multiple_choice_and_generation(tmp_path: Path, mot_experts: list[Any]) -> None:
    from evals.benchmarks.base import Example, MultipleChoiceBenchmark
    from evals.runner import evaluate

    class Tiny(MultipleChoiceBenchmark):
        name = "tiny-mc"

        def load_examples(self) -> list[Example]:
            return [Example(id=f"q{a}", question=f"What is {a} + {a}?", gold=a % 3, choices=[str(2 * a), str(a), str(a + 1)]) for a in range(4)]

        def context(self, example: Example) -> str:
            return f"Question: {example.question}\nAnswer:"

    mix = make_mixture(mot_experts, gate=1.0, top_k=2, seed=4)
    res = evaluate(mix, Tiny(), out_dir=tmp_path / "mc", progress=False)
    assert res.mode == "loglikelihood" and res.n == 4
    rows = [json.loads(x) for x in (tmp_path / "mc" / "results.jsonl").read_text().splitlines()]
    bench = Tiny()
    for r, ex in zip(rows, bench.examples()):
        want = [round(ll, 4) for ll, _ in mix.loglikelihood_batch(bench.pairs(ex))]
        assert r["detail"]["loglikelihoods"] == pytest.approx(want, abs=2e-4)
    gen = evaluate(mix, "skill:mixed", limit=2, out_dir=tmp_path / "gen", progress=False, max_tokens=8)
    assert gen.mode == "generate" and gen.n == 2
    traces = [json.loads(x)["trace"] for x in (tmp_path / "gen" / "results.jsonl").read_text().splitlines()]
    assert all(t["type"] == "latent" and t["primary"] in t["experts"] for t in traces)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, trained: Path, mot_dirs: list[Path]) -> Iterator[Any]:
    from collab.server import CollabServer, ServeOptions, create_app
    from tests.server.helpers import Running

    root = tmp_path_factory.mktemp("serve-mot")
    spec = load_spec(_spec(root, mot_dirs, {"type": "latent", "checkpoint": str(trained), "experts": ["llama", "qwen"]}))
    server = CollabServer.from_spec(spec, ServeOptions(max_wait_ms=20))
    server.load()
    with Running(create_app(server)) as running:
        yield running, spec
    server.close()


def test_openai_client_gets_the_mixtures_answer_and_trace(served: Any) -> None:
    import openai

    running, spec = served
    client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    want = spec.system("mot").generate(GenerationRequest.chat("What is 2 + 2?", max_tokens=10))
    r = client.chat.completions.create(model="mot", messages=msgs, max_tokens=10)
    assert r.choices[0].message.content == want.text
    trace = r.model_extra["collab"]
    assert trace["type"] == "latent" and trace["primary"] == want.trace["primary"] and trace["experts"] == want.trace["experts"]
    chunks = list(client.chat.completions.create(model="mot", messages=msgs, max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
