"""``type: codecode`` in a spec: a valid one builds a working co-decoder; every wrong
key, expert or head is refused naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from collab.errors import SpecError
from collab.spec import load_spec
from collab.system import GenerationRequest
from decoding.system import CoDecoderSystemType, CoLLMDecoder
from tests.decoding.conftest import random_head, write_head


@pytest.fixture(autouse=True, scope="module")
def codecode_type() -> Iterator[None]:
    """Register the type as the ``collab.system_types`` entry point will."""
    from collab.spec import _REGISTRY, register_system_type, system_types

    registered = "codecode" not in system_types()
    if registered:
        register_system_type("codecode", CoDecoderSystemType())
    yield
    if registered:
        _REGISTRY.pop("codecode", None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, assistant_dirs: list[Path], tiny_expert: Any, assistants: list[Any]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("spec")
    head = random_head(2, seed=1, scale=0.3)
    write_head(root / "head2", head, tiny_expert, assistants)
    write_head(root / "head1", random_head(1, seed=2), tiny_expert, assistants[:1])
    return {"root": root, "head": head}


def _spec(setup: dict[str, Any], tiny_model_dir: Path, assistant_dirs: list[Path], system: dict[str, Any], name: str = "spec.yaml") -> Path:
    data = {
        "experts": {"base": {"ref": str(tiny_model_dir)}, "a0": {"ref": str(assistant_dirs[0])}, "a1": {"ref": str(assistant_dirs[1])},
                    "far": {"url": "http://127.0.0.1:9/v1", "model": "m"}},
        "systems": {"duo": system},
    }
    path = setup["root"] / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_spec_builds_a_co_decoder_equal_to_the_python_one(setup: dict[str, Any], tiny_model_dir: Path, assistant_dirs: list[Path], tiny_expert: Any, assistants: list[Any]) -> None:
    path = _spec(setup, tiny_model_dir, assistant_dirs, {"type": "codecode", "base": "base", "assistants": ["a0", "a1"], "head": "head2", "threshold": 0.5})
    spec = load_spec(path)
    duo = spec.system("duo")
    assert isinstance(duo, CoLLMDecoder) and duo.name == "duo" and duo.threshold == 0.5
    assert duo.base is spec.system("base")  # the spec's experts, shared, not copies
    req = GenerationRequest.chat("What is 2 + 2?", max_tokens=12)
    c = duo.generate(req)
    direct = CoLLMDecoder(tiny_expert, assistants, setup["head"], threshold=0.5).generate(req)
    assert c.text == direct.text and [t["by"] for t in c.trace["tokens"]] == [t["by"].replace("asst", "a").replace("tiny", "base") for t in direct.trace["tokens"]]
    # one assistant under the singular key; the threshold defaults to 0.5
    one = load_spec(_spec(setup, tiny_model_dir, assistant_dirs, {"type": "codecode", "base": "base", "assistant": "a0", "head": "head1"}, "one.yaml"))
    assert one.system("duo").threshold == 0.5 and [a.name for a in one.system("duo").assistants] == ["a0"]


@pytest.mark.parametrize(
    ("system", "key", "message"),
    [
        ({"base": "base", "assistants": ["a0", "a1"], "head": "head2", "eta": 0.5}, "systems.duo.eta", "unknown key for type 'codecode'"),
        ({"assistants": ["a0", "a1"], "head": "head2"}, "systems.duo.base", "missing"),
        ({"base": "nobody", "assistants": ["a0", "a1"], "head": "head2"}, "systems.duo.base", "unknown expert 'nobody'"),
        ({"base": "far", "assistants": ["a0", "a1"], "head": "head2"}, "systems.duo.base", "remote endpoint"),
        ({"base": "base", "assistants": ["a0", "far"], "head": "head2"}, "systems.duo.assistants[1]", "remote endpoint"),
        ({"base": "base", "head": "head2"}, "systems.duo", "exactly one of 'assistant'"),
        ({"base": "base", "assistant": "a0", "assistants": ["a1"], "head": "head2"}, "systems.duo", "exactly one of 'assistant'"),
        ({"base": "base", "assistants": [], "head": "head2"}, "systems.duo.assistants", "non-empty list"),
        ({"base": "base", "assistants": ["a0", "a0"], "head": "head2"}, "systems.duo.assistants", "listed twice"),
        ({"base": "base", "assistants": ["a0"], "head": "head2"}, "systems.duo.assistants", "trained for 2 assistant(s) (asst0, asst1); 1 given"),
        ({"base": "base", "assistants": ["a0", "a1"]}, "systems.duo.head", "missing"),
        ({"base": "base", "assistants": ["a0", "a1"], "head": "nowhere"}, "systems.duo.head", "directory 'nowhere' not found"),
        ({"base": "base", "assistants": ["a0", "a1"], "head": "head2", "threshold": 1.5}, "systems.duo.threshold", "from 0 (always defer) to 1"),
        ({"base": "base", "assistants": ["a0", "a1"], "head": "head2", "threshold": "high"}, "systems.duo.threshold", "expected a number"),
    ],
)
def test_spec_errors_name_the_file_and_key(setup: dict[str, Any], tiny_model_dir: Path, assistant_dirs: list[Path], system: dict[str, Any], key: str, message: str) -> None:
    path = _spec(setup, tiny_model_dir, assistant_dirs, {"type": "codecode", **system}, "bad.yaml")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value).startswith(f"{path}: {key}: ")
    assert message in str(e.value)


def test_spec_refuses_a_directory_that_is_not_a_head(setup: dict[str, Any], tiny_model_dir: Path, assistant_dirs: list[Path]) -> None:
    other = setup["root"] / "router"
    other.mkdir(exist_ok=True)
    (other / "config.json").write_text(json.dumps({"type": "knn", "version": 1}))
    path = _spec(setup, tiny_model_dir, assistant_dirs, {"type": "codecode", "base": "base", "assistants": ["a0", "a1"], "head": "router"}, "notahead.yaml")
    with pytest.raises(SpecError, match=r"systems\.duo\.head: .*type: expected 'colm-head'.*found 'knn'"):
        load_spec(path)


def test_spec_refuses_zoo_experts_other_than_the_trained_ones(setup: dict[str, Any]) -> None:
    from collab.io import atomic_directory
    from decoding.artefact import HeadConfig, save_head

    hc = HeadConfig(base={"name": "smol", "ref": "zoo:smollm2-135m-instruct"}, assistants=[{"name": "arith", "ref": "zoo:smol-arith"}], hidden_size=576, vocab_size=49152)
    with atomic_directory(setup["root"] / "zoo-head", overwrite=True) as tmp:
        save_head(tmp, random_head(1, hidden=576), hc)
    path = setup["root"] / "zoo.yaml"
    path.write_text(yaml.safe_dump({
        "experts": {"smol": {"ref": "zoo:smollm2-135m-instruct"}, "lists": {"ref": "zoo:smol-lists"}},
        "systems": {"duo": {"type": "codecode", "base": "smol", "assistant": "lists", "head": "zoo-head"}},
    }))
    with pytest.raises(SpecError, match=r"systems\.duo\.assistants\[0\]: expert 'lists' is zoo:smol-lists, but the head 'zoo-head' was trained with zoo:smol-arith"):
        load_spec(path)
