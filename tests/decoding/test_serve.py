"""A co-decoder served from a spec: the OpenAI client gets the co-decoder's answer, with
the per-token trace in the response's ``collab`` field, streamed or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from collab.system import GenerationRequest
from tests.decoding.conftest import random_head, write_head
from tests.decoding.test_spec import codecode_type  # noqa: F401 - registers type: codecode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, assistant_dirs: list[Path], tiny_expert: Any, assistants: list[Any]) -> Iterator[Any]:
    from collab.server import CollabServer, ServeOptions, create_app
    from collab.spec import load_spec
    from tests.server.conftest import Running

    root = tmp_path_factory.mktemp("serve-duo")
    write_head(root / "head", random_head(1, seed=3, scale=0.3), tiny_expert, assistants[:1])
    (root / "spec.yaml").write_text(yaml.safe_dump({
        "experts": {"base": {"ref": str(tiny_model_dir)}, "a0": {"ref": str(assistant_dirs[0])}},
        "systems": {"duo": {"type": "codecode", "base": "base", "assistant": "a0", "head": "head", "threshold": 0.9}},
    }))
    spec = load_spec(root / "spec.yaml")
    server = CollabServer.from_spec(spec, ServeOptions(max_wait_ms=20))
    server.load()
    with Running(create_app(server)) as running:
        yield running, spec
    server.close()


def test_openai_client_gets_the_co_decoders_answer_and_trace(served: Any) -> None:
    import openai

    running, spec = served
    client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
    want = spec.system("duo").generate(GenerationRequest.chat("What is 2 + 2?", max_tokens=12))
    r = client.chat.completions.create(model="duo", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=12)
    assert r.choices[0].message.content == want.text
    trace = r.model_extra["collab"]
    assert trace["type"] == "codecode" and trace["tokens"] == want.trace["tokens"]
    assert 0 < trace["deferral_rate"] < 1 and set(trace["tokens_by_expert"]) == {"base", "a0"}
    chunks = list(client.chat.completions.create(model="duo", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
