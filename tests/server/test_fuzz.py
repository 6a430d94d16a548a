"""A fuzz pass over the server's OpenAPI schema with schemathesis: generated valid
and invalid bodies for every operation, no 5xx and never a non-JSON error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from collab.server import CollabServer, ServeOptions, create_app
from collab.server.schema import Limits
from tests.server.helpers import write_spec


def _app() -> Any:
    import tempfile

    from collab.spec import load_spec
    from routers.baselines import constant_router
    from tests.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="collab-fuzz-"))
    model = make_tiny_model(root / "tiny", seed=0)
    constant_router(["tiny", "other"], [0.7, 0.3]).save(root / "router")
    spec = write_spec(root / "s.yaml", {"tiny": str(model), "other": str(model)}, "systems:\n  auto: {type: route, router: router, experts: [tiny, other]}\n")
    # small limits keep each generated request quick on the tiny model
    server = CollabServer.from_spec(load_spec(spec), ServeOptions(max_wait_ms=1, limits=Limits(max_tokens=16, max_n=2)))
    server.load()
    return create_app(server)


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


def answers_as_json_or_sse(response: Any, case: Any) -> None:
    """Every error is the JSON error object; every success is JSON or an SSE stream."""
    ctype = response.headers.get("content-type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    elif ctype.startswith("text/event-stream"):
        assert response.text.rstrip().endswith(("data: [DONE]", "}")), response.text[-200:]


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case: Any) -> None:
    # most generated model names are unknown (404); point half the bodies at served models
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and len(case.body["model"]) % 2:
        case.body["model"] = ("tiny", "auto")[len(case.body["model"]) % 4 // 2]
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
    answers_as_json_or_sse(response, case)


@pytest.mark.parametrize("model", ["tiny", "auto", "nope"])
def test_known_models_with_fuzzed_fields(model: str) -> None:
    """Valid model names, so generation itself is exercised (the schema alone says any string)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from starlette.testclient import TestClient

    client = TestClient(schema.app)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
    # mostly plausible values, so that most bodies get past validation into generation
    plausible = {
        "max_tokens": st.integers(-2, 20),
        "max_completion_tokens": st.integers(-2, 20),
        "temperature": st.floats(-0.5, 2.5),
        "top_p": st.floats(-0.1, 1.1),
        "n": st.integers(-2, 3),
        "seed": st.integers(-(2**63), 2**63),
        "stream": st.booleans(),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
        "user": st.text(max_size=5),
    }
    roles = st.sampled_from(["user", "user", "system", "assistant", "developer", "tool"])
    clean_message = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=50)})
    dirty_message = st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=50), scalars)})
    clean = st.fixed_dictionaries({"model": st.just(model), "messages": st.lists(clean_message, min_size=1, max_size=3)}, optional=plausible)
    dirty = st.fixed_dictionaries(
        {"model": st.just(model), "messages": st.lists(dirty_message, max_size=3)},
        optional={k: st.one_of(v, scalars) for k, v in plausible.items()},
    )
    fields = st.one_of(clean, dirty)

    @given(fields)
    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(body: dict[str, Any]) -> None:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
