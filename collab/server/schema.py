"""Request bodies as the OpenAI API phrases them, and the responses collab sends.

The models check shapes and types only (a mismatch is a 422); values are
checked when a body becomes ``GenerationRequest``s (a bad value is a 400 that
names the field). Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from collab.server.errors import APIError
from collab.system import Completion, GenerationRequest, Usage

#: Roles a message may have; ``developer`` (OpenAI's newer name) is read as ``system``.
ROLES = ("system", "developer", "user", "assistant")
#: The most stop strings one request may give.
MAX_STOPS = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str = Field(description="A model id from GET /v1/models: an expert or a system of the spec.")
    max_tokens: int | None = Field(None, description="Most tokens to generate (default 256).")
    temperature: float | None = Field(None, description="0 is greedy; at most 2.")
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, description="How many choices (each decoded separately).")
    seed: int | None = Field(None, description="With temperature > 0, the same seed gives the same sample; choice i uses seed + i.")
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens.")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool | None = None
    logprobs: int | None = Field(None, description="With echo and max_tokens 0: the prompt's token log-probabilities (scoring).")


class Limits(BaseModel):
    """What the server accepts: ``max_tokens`` up to ``max_tokens`` (or the model's
    context window, if smaller), ``n`` up to ``max_n``."""

    max_tokens: int = 8192
    max_n: int = 8


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    if not body.messages:
        raise _bad("messages", "expected at least one message")
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise _bad(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, found {m.role!r}")
        if isinstance(m.content, list):
            parts = []
            for j, p in enumerate(m.content):
                if p.type != "text" or p.text is None:
                    raise _bad(f"messages[{i}].content[{j}]", f"only text parts are supported, found type {p.type!r}")
                parts.append(p.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _common(body: _Sampling, max_tokens: int | None, limits: Limits, window: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    cap = min(limits.max_tokens, window) if window else limits.max_tokens
    if max_tokens is not None:
        if max_tokens < 1 or max_tokens > cap:
            where = f"the model's context window ({window} tokens)" if window and window <= limits.max_tokens else "the server's limit"
            raise _bad("max_tokens", f"expected 1 <= max_tokens <= {cap} ({where}), found {max_tokens}")
        kw["max_tokens"] = max_tokens
    if body.temperature is not None:
        if not 0.0 <= body.temperature <= 2.0:
            raise _bad("temperature", f"expected 0 <= temperature <= 2, found {body.temperature}")
        kw["temperature"] = body.temperature
    if body.top_p is not None:
        if not 0.0 < body.top_p <= 1.0:
            raise _bad("top_p", f"expected 0 < top_p <= 1, found {body.top_p}")
        kw["top_p"] = body.top_p
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"expected at most {MAX_STOPS} stop strings, found {len(stops)}")
    kw["stop"] = stops
    return kw


def choices_count(body: _Sampling, limits: Limits) -> int:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= limits.max_n:
        raise _bad("n", f"expected 1 <= n <= {limits.max_n}, found {n}")
    return n


def _seeded(kw: dict[str, Any], seed: int | None, n: int) -> list[dict[str, Any]]:
    # choice i samples with seed + i: n seeded choices differ, and each is reproducible
    return [{**kw, "seed": None if seed is None else seed + i} for i in range(n)]


def chat_requests(body: ChatCompletionRequest, limits: Limits, window: int | None) -> list[GenerationRequest]:
    """One GenerationRequest per choice; APIError 400 naming the field for a bad value."""
    n = choices_count(body, limits)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    kw = _common(body, max_tokens, limits, window)
    messages = _messages(body)
    return [_request(messages=messages, **k) for k in _seeded(kw, body.seed, n)]


def completion_prompts(body: CompletionRequest) -> list[str]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise _bad("prompt", "expected a string or a non-empty list of strings")
    return prompts


def completion_requests(body: CompletionRequest, limits: Limits, window: int | None) -> list[GenerationRequest]:
    """One GenerationRequest per (prompt, choice), prompt-major, as OpenAI orders choices."""
    n = choices_count(body, limits)
    prompts = completion_prompts(body)
    if len(prompts) * n > limits.max_n:
        raise _bad("prompt", f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} choices; at most {limits.max_n}")
    kw = _common(body, body.max_tokens, limits, window)
    return [_request(prompt=p, **k) for p in prompts for k in _seeded(kw, body.seed, n)]


def _request(**kw: Any) -> GenerationRequest:
    from collab.errors import RequestError

    try:
        return GenerationRequest(**kw)
    except RequestError as e:
        raise APIError(400, str(e), code="invalid_value") from e


# ----------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(completions: list[Completion], prompts_counted: int = 1) -> dict[str, int]:
    """Usage over the choices: each distinct prompt counted once, every choice's tokens."""
    per_prompt = len(completions) // max(1, prompts_counted)
    prompt = sum(c.usage.prompt_tokens for c in completions[:: max(1, per_prompt)])
    completion = sum(c.usage.completion_tokens for c in completions)
    return Usage(prompt, completion).to_dict()


def _response(rid: str, model: str, obj: str, choices: list[dict[str, Any]], completions: list[Completion], prompts: int = 1) -> dict[str, Any]:
    """The response around ``choices``: with several choices each carries its own
    trace, and the top-level ``collab`` field is the first one's."""
    if len(completions) > 1:
        for choice, c in zip(choices, completions):
            choice["collab"] = c.trace
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_of(completions, prompts),
        "collab": completions[0].trace,
    }


def chat_response(rid: str, model: str, completions: list[Completion]) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason, "logprobs": None}
        for i, c in enumerate(completions)
    ]
    return _response(rid, model, "chat.completion", choices, completions)


def completion_response(rid: str, model: str, completions: list[Completion], prompts: int) -> dict[str, Any]:
    choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(completions)]
    return _response(rid, model, "text_completion", choices, completions, prompts)


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def text_chunk(rid: str, created: int, model: str, index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}],
    }


