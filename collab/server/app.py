"""The OpenAI-compatible HTTP app over a ``CollabServer``.

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(plain and server-sent events ending in ``data: [DONE]``), ``GET /health``,
``GET /metrics`` (Prometheus text) and the playground at ``/``. Every answer
carries ``usage`` and a ``collab`` object with the system's trace. Errors follow
``collab.server.errors``. One log line per ``/v1`` request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from collab.errors import CollabError
from collab.server.core import CollabServer, Model
from collab.server.errors import APIError, api_error
from collab.server.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_requests,
    chat_response,
    completion_prompts,
    completion_requests,
    completion_response,
    new_id,
    text_chunk,
    usage_of,
)
from collab.system import Completion, GenerationRequest

log = logging.getLogger("collab.server")

_ERRORS = {s: {"description": d, "content": {"application/json": {"example": APIError(s, d).body()}}} for s, d in (
    (400, "Malformed JSON or an invalid value"),
    (401, "Missing or wrong bearer key"),
    (404, "Unknown model"),
    (413, "Prompt over the context window, or body too large"),
    (422, "Body does not match the schema"),
    (429, "The model's queue is full"),
    (500, "An expert failed"),
    (503, "Still loading"),
)}


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the server's limit of {limit} bytes")


def _info(request: Request) -> dict[str, Any]:
    """What the access log and the metrics record about this request (filled by the handler)."""
    return request.scope.setdefault("state", {}).setdefault("collab", {})


# ------------------------------------------------------------------ guard
class Guard:
    """Outermost layer for ``/v1``: bearer key (401), body size (413), then one log
    line and the request metrics once the response is complete."""

    def __init__(self, app: Any, server: CollabServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = {"code": 500}
        info = scope.setdefault("state", {}).setdefault("collab", {})
        opts = self.server.options

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.server.metrics.in_flight.inc(1)
        try:
            headers = dict(scope.get("headers") or [])
            if opts.api_key:
                given = headers.get(b"authorization", b"")
                if not secrets.compare_digest(given, f"Bearer {opts.api_key}".encode()):
                    what = "missing" if not given else "wrong"
                    err = APIError(401, f"{what} API key: send 'Authorization: Bearer KEY' with the server's key", code="invalid_api_key")
                    await JSONResponse(err.body(), err.status)(scope, receive, send_status)
                    info["error"] = err.message
                    return
            length = headers.get(b"content-length")
            limit = opts.max_body_bytes
            if length is not None and (not length.isdigit() or int(length) > limit):
                err = APIError(413, f"request body of {length.decode(errors='replace')} bytes is over the server's limit of {limit} bytes", code="body_too_large")
                await JSONResponse(err.body(), err.status)(scope, receive, send_status)
                info["error"] = err.message
                return
            received = 0

            async def limited() -> dict[str, Any]:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise _BodyTooLarge(limit)
                return message

            await self.app(scope, limited, send_status)
        finally:
            self.server.metrics.in_flight.inc(-1)
            self._account(scope, info, info.get("status", status["code"]), time.monotonic() - t0)

    def _account(self, scope: dict[str, Any], info: dict[str, Any], status: int, latency: float) -> None:
        m = self.server.metrics
        endpoint = scope["path"]
        model = info.get("model", "")
        if model not in self.server.names:  # a client's typo must not become a metric series
            model = ""
        m.requests.inc(endpoint=endpoint, model=model, status=str(status))
        if status >= 400:
            m.errors.inc(status=str(status))
        completions: list[Completion] = info.get("completions") or []
        prompt = info.get("prompt_tokens", 0)
        completion = sum(c.usage.completion_tokens for c in completions)
        if model:
            m.latency.observe(latency, model=model)
            if prompt or completion:
                m.tokens.inc(prompt, model=model, kind="prompt")
                m.tokens.inc(completion, model=model, kind="completion")
        for c in completions:
            routed = c.trace.get("routed_to") if isinstance(c.trace, dict) else None
            if routed:
                m.routed.inc(system=model, expert=str(routed))
        parts = [scope["method"], endpoint, f"status={status}"]
        if info.get("model"):
            parts.append(f"model={json.dumps(str(info['model']))[1:-1][:100]}")
        if "stream" in info:
            parts.append(f"stream={str(info['stream']).lower()}")
        if completions or prompt:
            parts.append(f"tokens={prompt}+{completion}")
        parts.append(f"latency={latency:.3f}s")
        if info.get("queue_wait") is not None:
            parts.append(f"queue={info['queue_wait']:.3f}s")
        if completions:
            parts.extend(_trace_summary(completions[0].trace))
        if info.get("error"):
            parts.append(f"error={json.dumps(str(info['error'])[:300])}")
        log.info(" ".join(parts))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: Any) -> str | None:
    """A validation error's location as OpenAI writes it (``messages[0].role``),
    without the body prefix and pydantic's union-member tags (``stop.str``)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "json-or-python"))):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _trace_summary(trace: Any) -> list[str]:
    if not isinstance(trace, dict):
        return []
    out = []
    for key in ("routed_to", "expert", "fallback_from"):
        if trace.get(key):
            out.append(f"{key}={trace[key]}")
    return out


# ------------------------------------------------------------------- app
def create_app(server: CollabServer) -> FastAPI:
    """The FastAPI app serving ``server``'s models."""
    app = FastAPI(
        title="collab",
        summary="Several expert LLMs as one OpenAI-compatible endpoint.",
        version="1",
        docs_url=None,  # Swagger UI loads from a CDN; /openapi.json has the schema
        redoc_url=None,
    )
    app.state.collab = server
    app.add_middleware(Guard, server=server)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _info(request)["error"] = exc.message
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(CollabError)
    async def _collab_error(request: Request, exc: CollabError) -> JSONResponse:
        err = api_error(exc, _info(request).get("model"))
        _info(request)["error"] = err.message
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        err = api_error(exc, _info(request).get("model"))
        _info(request)["error"] = err.message
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # the most specific error first: of a union's alternatives, the one that got furthest
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid body", "type": ""}
        param = _param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            at = first.get("loc", ())[-1] if first.get("loc") else "?"
            reason = (first.get("ctx") or {}).get("error") or first.get("msg")
            err = APIError(400, f"malformed JSON: {reason} (at character {at})", code="invalid_json")
        else:
            what = f"{param}: " if param else ""
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            err = APIError(422, f"{what}{first.get('msg')}{more}", param=param, code="invalid_schema")
        _info(request)["error"] = err.message
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"no such path: {request.method} {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        err = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), code={413: "body_too_large"}.get(exc.status_code))
        _info(request)["error"] = err.message
        return JSONResponse(err.body(), err.status)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("collab.server").joinpath("static/playground.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/health", summary="Ready when every model is loaded (200), else 503")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": server.status, "models": server.names, "loaded": len(server.models)}
        if server.error is not None:
            body["error"] = str(server.error)
        return JSONResponse(body, 200 if server.status == "ready" else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses={401: _ERRORS[401]})
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server, n) for n in server.names]}

    @app.get("/v1/models/{model}", responses={401: _ERRORS[401], 404: _ERRORS[404]})
    async def get_model(model: str) -> dict[str, Any]:
        if model not in server.names:
            server.model(model)  # raises the 404
        return _model_card(server, model)

    gen_errors: dict[int | str, dict[str, Any]] = {s: _ERRORS[s] for s in (400, 401, 404, 413, 422, 429, 500, 503)}

    @app.post("/v1/chat/completions", responses=gen_errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        info = _info(request)
        info.update(model=body.model, stream=bool(body.stream))
        model = server.model(body.model)
        requests = chat_requests(body, server.options.limits, model.context_window)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _answer(server, request, model, requests, chat=True, stream=bool(body.stream), include_usage=include_usage)

    @app.post("/v1/completions", responses=gen_errors)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        info = _info(request)
        info.update(model=body.model, stream=bool(body.stream))
        model = server.model(body.model)
        if body.echo and body.max_tokens == 0:
            return await _score(request, model, body)
        requests = completion_requests(body, server.options.limits, model.context_window)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        echo = completion_prompts(body) if body.echo else None
        return await _answer(server, request, model, requests, chat=False, stream=bool(body.stream), include_usage=include_usage, echo=echo)

    return app


def _model_card(server: CollabServer, name: str) -> dict[str, Any]:
    kind = server.models[name].kind if name in server.models else server.kinds.get(name, "")
    return {"id": name, "object": "model", "created": 0, "owned_by": "collab", "collab": {"type": kind, "ready": name in server.models}}


# -------------------------------------------------------------- generation
async def _start(server: CollabServer, model: Model, requests: list[GenerationRequest], deltas: bool) -> tuple[asyncio.Queue[Any], list[Any]]:
    """Start every choice; their events arrive on one asyncio queue as (choice, kind, value)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Any] = asyncio.Queue()
    handles: list[Any] = []

    def start_all() -> None:
        for i, r in enumerate(requests):
            def deliver(event: tuple[str, Any], i: int = i) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (i, *event))

            handles.append(server.start(model, r, deliver, deltas=deltas))

    try:
        await run_in_threadpool(start_all)  # encoding a long prompt stays off the event loop
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return events, handles


async def _next(events: asyncio.Queue[Any], request: Request | None) -> tuple[int, str, Any]:
    """The next event; ClientGone if the client disconnects while waiting (checked each second)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                raise ClientGone() from None


def _queue_wait(handles: list[Any]) -> float | None:
    waits = [h.queue_wait for h in handles if getattr(h, "queue_wait", None) is not None]
    return max(waits) if waits else None


async def _answer(
    server: CollabServer,
    request: Request,
    model: Model,
    requests: list[GenerationRequest],
    *,
    chat: bool,
    stream: bool,
    include_usage: bool,
    echo: list[str] | None = None,
) -> Response:
    info = _info(request)
    rid = new_id("chatcmpl" if chat else "cmpl")
    n_prompts = len(echo) if echo is not None else 1
    events, handles = await _start(server, model, requests, deltas=stream)
    if not stream:
        done: list[Completion | None] = [None] * len(requests)
        try:
            for _ in range(len(requests)):
                i, kind, value = await _next(events, request)
                if kind == "error":
                    raise api_error(value, model.name)
                done[i] = value
        except ClientGone:
            info["status"] = 499
            return Response(status_code=499)
        finally:
            for h in handles:
                h.cancel()
            info["queue_wait"] = _queue_wait(handles)
        completions = [c for c in done if c is not None]
        usage = usage_of(completions, n_prompts)
        info.update(completions=completions, prompt_tokens=usage["prompt_tokens"])
        if chat:
            return JSONResponse(chat_response(rid, model.name, completions))
        if echo is not None:
            per = len(completions) // len(echo)
            for k, c in enumerate(completions):
                c.text = echo[k // per] + c.text
        return JSONResponse(completion_response(rid, model.name, completions, n_prompts))

    try:
        first = await _next(events, request)
    except ClientGone:
        for h in handles:
            h.cancel()
        info["status"] = 499
        return Response(status_code=499)
    if first[1] == "error":
        for h in handles:
            h.cancel()
        raise api_error(first[2], model.name)
    body = _sse(request, events, first, handles, model.name, rid, len(requests), n_prompts, chat, include_usage, echo)
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(
    request: Request,
    events: asyncio.Queue[Any],
    first: tuple[int, str, Any],
    handles: list[Any],
    name: str,
    rid: str,
    n: int,
    n_prompts: int,
    chat: bool,
    include_usage: bool,
    echo: list[str] | None,
) -> AsyncIterator[str]:
    info = _info(request)
    created = int(time.time())
    done: list[Completion | None] = [None] * n
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str | None, finish: str | None = None, **more: Any) -> str:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            body = chat_chunk(rid, created, name, i, delta, finish)
        else:
            body = text_chunk(rid, created, name, i, text or "", finish)
        return _data({**body, **extra, **more})

    try:
        for i in range(n):
            if chat:
                yield _data({**chat_chunk(rid, created, name, i, {"role": "assistant", "content": ""}), **extra})
            elif echo is not None:
                yield chunk(i, echo[i // (n // len(echo))])
        event = first
        remaining = n
        while True:
            i, kind, value = event
            if kind == "delta":
                yield chunk(i, value)
            elif kind == "done":
                done[i] = value
                remaining -= 1
                yield chunk(i, None, value.finish_reason, collab=value.trace)
                if remaining == 0:
                    break
            else:
                err = api_error(value, name)
                info.update(status=err.status, error=err.message)
                yield _data(err.body())
                return
            event = await _next(events, None)  # a disconnect cancels this generator (Starlette listens for it)
        completions = [c for c in done if c is not None]
        usage = usage_of(completions, n_prompts)
        info.update(completions=completions, prompt_tokens=usage["prompt_tokens"])
        if include_usage:
            yield _data({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": name, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        info["status"] = 499
        info["error"] = "client disconnected"
        raise
    finally:
        for h in handles:
            h.cancel()
        info["queue_wait"] = _queue_wait(handles)


async def _score(request: Request, model: Model, body: CompletionRequest) -> Response:
    """``echo`` with ``max_tokens: 0``: the prompts' token log-probabilities."""
    from collab.experts import Expert
    from collab.server.scoring import prompt_logprobs

    expert = model.system
    if not isinstance(expert, Expert):
        raise APIError(400, f"model '{model.name}' cannot score text (echo with max_tokens 0 needs a local expert)", param="echo", code="invalid_value")
    prompts = completion_prompts(body)
    top = body.logprobs if body.logprobs is not None else 1
    if not 0 <= top <= 20:
        raise APIError(400, f"logprobs: expected 0 <= logprobs <= 20, found {top}", param="logprobs", code="invalid_value")
    choices, prompt_tokens = [], 0
    for i, p in enumerate(prompts):
        lp = await run_in_threadpool(prompt_logprobs, expert, p, top)
        prompt_tokens += len(lp["tokens"])
        choices.append({"index": i, "text": p, "finish_reason": "length", "logprobs": lp})
    info = _info(request)
    info["prompt_tokens"] = prompt_tokens
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    return JSONResponse({"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model.name, "choices": choices, "usage": usage})
