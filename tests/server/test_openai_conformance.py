"""The official `openai` client against `collab serve`, unchanged: models, chat,
completions, streaming, stop, n, seed, usage, the collab trace, errors and auth."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from collab.system import GenerationRequest
from tests.server.helpers import Served

Q = "What is 2 + 2?"


def _chat(client: Any, content: str = Q, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=kw.pop("model", "tiny"), messages=[{"role": "user", "content": content}], **kw)


def test_lists_every_model_of_the_spec(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models] == ["tiny", "plain"]
    assert all(m.object == "model" and m.owned_by == "collab" for m in models)
    assert models.data[0].model_extra["collab"] == {"type": "expert", "ready": True}
    assert client.models.retrieve("plain").id == "plain"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_answers_as_the_expert_does(client: Any, tiny_expert: Any) -> None:
    r = _chat(client)
    direct = tiny_expert.generate(GenerationRequest.chat(Q, max_tokens=12))
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == direct.text
    assert r.choices[0].finish_reason == direct.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (direct.usage.prompt_tokens, direct.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["collab"] == {"system": "tiny", "type": "expert", "expert": "tiny", "prompt_format": "chat_template"}


def test_completions_continue_the_raw_prompt(client: Any, tiny_expert: Any) -> None:
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=10)
    direct = tiny_expert.generate(GenerationRequest(prompt="The capital of France is", max_tokens=10))
    assert r.object == "text_completion" and r.choices[0].text == direct.text
    assert r.usage.prompt_tokens == direct.usage.prompt_tokens and r.usage.completion_tokens == direct.usage.completion_tokens
    assert r.model_extra["collab"]["prompt_format"] == "raw"


def test_a_model_without_chat_template_uses_the_plain_format(client: Any) -> None:
    r = _chat(client, model="plain")
    assert r.model_extra["collab"]["prompt_format"] == "plain" and r.model == "plain"


@pytest.mark.parametrize("chat", [True, False])
def test_stream_joins_to_the_plain_answer(client: Any, chat: bool) -> None:
    if chat:
        full = _chat(client, max_tokens=16)
        chunks = list(_chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = full.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        full = client.completions.create(model="tiny", prompt="Hello there", max_tokens=16)
        chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=16, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = full.choices[0].text
    assert text == expected
    assert len([c for c in chunks if c.choices and (c.choices[0].text if not chat else c.choices[0].delta.content)]) > 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[0].model_extra["collab"]["expert"] == "tiny"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_without_include_usage_sends_no_usage(client: Any) -> None:
    chunks = list(_chat(client, stream=True))
    assert all(c.choices for c in chunks) and all(getattr(c, "usage", None) is None for c in chunks)


def test_stop_cuts_before_the_stop_string(client: Any) -> None:
    full = _chat(client, max_tokens=24).choices[0].message.content
    assert len(full) > 6
    cut = full[3:6]
    expected = full[: full.find(cut)]
    for stop in (cut, [cut, "\u2603 never"]):
        r = _chat(client, max_tokens=24, stop=stop)
        assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, max_tokens=24, stop=cut, stream=True))
    assert streamed == expected


def test_max_tokens_and_max_completion_tokens(client: Any) -> None:
    for kw in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count from 1 to 30."}], **kw)
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == 3
        assert r.usage.completion_tokens <= 3


def test_n_choices_with_a_seed_are_reproducible_and_distinct(client: Any) -> None:
    kw = {"n": 3, "temperature": 1.5, "seed": 7, "max_tokens": 12}
    a, b = _chat(client, **kw), _chat(client, **kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert all(c.model_extra["collab"]["expert"] == "tiny" for c in a.choices)
    other = _chat(client, **{**kw, "seed": 8})
    assert [c.message.content for c in other.choices] != texts
    streamed = list(_chat(client, **kw, stream=True))
    joined = {i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)}
    assert [joined[i] for i in range(3)] == texts


def test_n_counts_the_prompt_once(client: Any) -> None:
    one = _chat(client, max_tokens=5)
    three = _chat(client, max_tokens=5, n=3)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens  # greedy: three equal answers


def test_unknown_fields_are_ignored(client: Any) -> None:
    r = _chat(client, user="someone", extra_body={"frequency_penalty": 0, "some_new_field": {"x": 1}})
    assert r.choices[0].message.content == _chat(client).choices[0].message.content


def test_errors_as_the_client_raises_them(served: Served, client: Any) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        _chat(served.client(key="wrong"))
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, model="nope")
    assert "model 'nope' not found" in e.value.body["message"] and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, temperature=3.5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        _chat(client, extra_body={"n": "two"})
    assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as e:
        _chat(client, content="word " * 400)
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"
    assert _chat(client).choices[0].message.content  # still serving
