"""`collab serve examples/zoo.yaml` on the real models: the zoo's five experts and
its routed system, to the official client, with streaming, auth and metrics."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from collab.system import GenerationRequest
from tests.server.helpers import ServeProcess, metric

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_serve_the_zoo(tmp_path: Path) -> None:
    from collab.experts import Expert

    with ServeProcess(str(ROOT / "examples/zoo.yaml"), "--api-key", "zoo-key", env={"OMP_NUM_THREADS": "2"}) as srv:
        srv.wait_ready(timeout=600)
        client = openai.OpenAI(base_url=srv.url, api_key="zoo-key", max_retries=0, timeout=300)
        models = {m.id: m.model_extra["collab"]["type"] for m in client.models.list()}
        assert models == {"smol": "expert", "gemma": "expert", "arith": "expert", "lists": "expert", "units": "expert", "auto": "route"}
        ask = [{"role": "user", "content": "What is 12 * 7?"}]
        r = client.chat.completions.create(model="auto", messages=ask, max_tokens=24)
        trace = r.model_extra["collab"]
        assert trace["type"] == "route" and set(trace["scores"]) == set(models) - {"auto"}
        routed = trace["routed_to"]
        direct = Expert.load({"smol": "zoo:smollm2-135m-instruct", "arith": "zoo:smol-arith", "lists": "zoo:smol-lists",
                              "units": "zoo:smol-units", "gemma": "zoo:gemma3-270m"}[routed]).generate(GenerationRequest(messages=ask, max_tokens=24))
        assert r.choices[0].message.content == direct.text
        chunks = list(client.chat.completions.create(model="smol", messages=ask, max_tokens=24, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="nope", max_retries=0).models.list()
        assert metric(srv.base, "collab_routed_total", system="auto", expert=routed) == 1
        assert metric(srv.base, "collab_requests_total", endpoint="/v1/chat/completions", model="smol", status="200") == 1
