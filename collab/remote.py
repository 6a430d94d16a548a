"""Experts behind an OpenAI-compatible HTTP endpoint (vLLM, SGLang, another
``collab serve``), answering through the same System and Scorer protocols as
local experts."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Iterator, Sequence

from collab.errors import RemoteError
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk, Usage

#: HTTP statuses that mean "the endpoint is struggling, try again": they are
#: retried with back-off, count towards the circuit breaker and fall back.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RemoteRefused(RemoteError):
    """The endpoint refused the request itself as invalid (HTTP 400, 413, 422):
    it is not retried, does not trip the circuit breaker and does not fall back,
    since any other system would refuse it too. ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CircuitBreaker:
    """Stops calling an endpoint that keeps failing.

    Closed: calls go through. After ``failures`` consecutive failed calls it opens:
    calls fail at once (``RemoteError: circuit open``) for ``cooldown`` seconds.
    Then one trial call goes through (half-open): its success closes the circuit,
    its failure opens it for another ``cooldown``."""

    def __init__(self, failures: int = 3, cooldown: float = 30.0) -> None:
        if failures < 1 or cooldown < 0:
            raise ValueError(f"CircuitBreaker: expected failures >= 1 and cooldown >= 0, found {failures}, {cooldown}")
        self.failures = failures
        self.cooldown = cooldown
        self.count = 0
        self.opened_at: float | None = None
        self.last_error = ""
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown else "open"

    def check(self, what: str) -> None:
        """RemoteError if the circuit is open (or a half-open trial is already under way)."""
        with self._lock:
            if self.opened_at is None:
                return
            left = self.cooldown - (time.monotonic() - self.opened_at)
            if left <= 0 and not self._trial:
                self._trial = True  # this call is the trial
                return
            raise RemoteError(
                f"{what}: circuit open after {self.count} consecutive failures (last: {self.last_error}); "
                f"next try in {max(0.0, left):.1f} s"
            )

    def success(self) -> None:
        with self._lock:
            self.count, self.opened_at, self._trial = 0, None, False

    def failure(self, error: str) -> None:
        with self._lock:
            self.count += 1
            self.last_error = error
            if self._trial or self.count >= self.failures:
                self.opened_at = time.monotonic()
            self._trial = False


class RemoteExpert(BaseSystem):
    """An expert behind an OpenAI-compatible HTTP endpoint (vLLM, SGLang, another ``collab serve``).

    ``url`` is the API base (``http://host:port/v1``). Chat requests go to
    ``/chat/completions``, raw prompts to ``/completions``; streaming reads the
    server-sent events. ``loglikelihood`` uses ``/completions`` with
    ``echo`` and ``logprobs``, which vLLM and collab serve support.

    Failures: ``timeout`` seconds per read (and at most 10 s to connect); a call
    that cannot connect or gets 408/429/5xx is retried ``retries`` times, after
    ``backoff`` x 2^attempt seconds (with jitter; a ``Retry-After`` header wins, up
    to 30 s); a stream is retried only before its first chunk. ``breaker_failures``
    consecutive failed calls open a ``CircuitBreaker`` for ``breaker_cooldown``
    seconds, during which calls fail at once (so a ``fallback`` answers without
    waiting). Every failure is a ``RemoteError`` naming the expert and the URL;
    a request the endpoint refuses as invalid is a ``RemoteRefused``.
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        name: str | None = None,
        timeout: float = 120.0,
        *,
        retries: int = 2,
        backoff: float = 0.25,
        breaker_failures: int = 3,
        breaker_cooldown: float = 30.0,
    ) -> None:
        import httpx

        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(f"RemoteExpert: expected timeout > 0, retries >= 0, backoff >= 0; found {timeout}, {retries}, {backoff}")
        self.url = url.rstrip("/")
        self.model = model
        self.name = name or model
        self.retries = retries
        self.backoff = backoff
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def _body(self, request: GenerationRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": stream,
        }
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.messages is not None:
            body["messages"] = request.messages
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    def _trace(self, remote_trace: Any = None) -> dict[str, Any]:
        t: dict[str, Any] = {"system": self.name, "type": "remote", "expert": self.name, "url": self.url, "model": self.model}
        if remote_trace:
            t["remote"] = remote_trace
        return t

    # ------------------------------------------------------------ failures
    def _where(self, path: str) -> str:
        return f"remote expert '{self.name}' at {self.url}{path}"

    def _failed(self, path: str, resp: Any) -> Exception:
        """The exception for a non-200 answer: RemoteRefused for a request the
        endpoint refused as invalid, else a failure the retry loop looks at."""
        message = f"{self._where(path)}: HTTP {resp.status_code}: {_error_message(resp)}"
        if resp.status_code in (400, 413, 422):
            return RemoteRefused(message, resp.status_code)
        return _StatusFailure(RemoteError(message), resp)

    def _retryable(self, error: BaseException) -> bool:
        import httpx

        if isinstance(error, _StatusFailure):
            return error.status in RETRY_STATUSES
        # a read timeout is not retried: the endpoint may still be working on it
        return isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.PoolTimeout))

    def _pause(self, attempt: int, error: BaseException) -> None:
        wait = self.backoff * (2**attempt) * (0.5 + random.random() / 2)
        after = getattr(error, "retry_after", None)
        if after is not None:
            wait = min(30.0, after)
        time.sleep(wait)

    def _call(self, path: str, send: Any) -> Any:
        """``send()`` with the breaker, retries and back-off; its result, or a RemoteError."""
        import httpx

        self.breaker.check(self._where(path))
        attempt = 0
        while True:
            try:
                out = send()
            except RemoteRefused:
                self.breaker.success()  # the endpoint is up; the request was wrong
                raise
            except (httpx.HTTPError, _StatusFailure, RemoteError) as e:
                if attempt < self.retries and self._retryable(e):
                    self._pause(attempt, e)
                    attempt += 1
                    continue
                err = e.error if isinstance(e, _StatusFailure) else e
                if not isinstance(err, RemoteError):
                    err = RemoteError(f"{self._where(path)}: {type(e).__name__}: {e or 'no detail'}")
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                self.breaker.failure(f"{type(e).__name__}")
                raise RemoteError(f"{err}{tries}") from e
            self.breaker.success()
            return out

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        def send() -> dict[str, Any]:
            resp = self._client.post(path, json=body)
            if resp.status_code != 200:
                raise self._failed(path, resp)
            try:
                data = resp.json()
            except ValueError as e:
                raise RemoteError(f"{self._where(path)}: the endpoint answered with something that is not JSON: {resp.text[:120]!r}") from e
            if not isinstance(data, dict):
                raise RemoteError(f"{self._where(path)}: expected a JSON object, found {type(data).__name__}")
            return data

        return self._call(path, send)

    def generate(self, request: GenerationRequest) -> Completion:
        path, body = self._body(request, stream=False)
        data = self._post(path, body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            usage = data.get("usage") or {}
            return Completion(
                text=text or "",
                finish_reason=choice.get("finish_reason") or "stop",
                usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                trace=self._trace(data.get("collab")),
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise RemoteError(f"{self._where(path)}: a malformed completion ({type(e).__name__}: {e}): {json.dumps(data)[:200]}") from e

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """Stream from the endpoint. Retries (and the breaker's verdict) apply until
        the first chunk; a failure after it is a RemoteError, as is a stream that
        ends before its finish reason or ``[DONE]``."""
        import httpx

        path, body = self._body(request, stream=True)
        finish: str | None = None
        usage = Usage()
        remote_trace = None
        opened: list[Any] = []

        def open_stream() -> Any:
            cm = self._client.stream("POST", path, json=body)
            resp = cm.__enter__()
            if resp.status_code != 200:
                resp.read()
                cm.__exit__(None, None, None)
                raise self._failed(path, resp)
            opened.append(cm)
            return resp

        resp = self._call(path, open_stream)
        done = False
        try:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(payload)
                except ValueError as e:
                    raise RemoteError(f"{self._where(path)}: a stream event that is not JSON: {payload[:120]!r}") from e
                if not isinstance(event, dict):
                    raise RemoteError(f"{self._where(path)}: a stream event that is not an object: {payload[:120]!r}")
                if event.get("error"):
                    raise RemoteError(f"{self._where(path)}: the endpoint failed mid-stream: {_event_error(event['error'])}")
                if event.get("usage"):
                    u = event["usage"]
                    usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
                remote_trace = event.get("collab") or remote_trace
                for choice in event.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if delta:
                        yield StreamChunk(text=delta)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            if not done and finish is None:
                raise RemoteError(f"{self._where(path)}: the stream ended before its answer did (no finish reason, no [DONE])")
        except httpx.HTTPError as e:
            self.breaker.failure(type(e).__name__)
            raise RemoteError(f"{self._where(path)}: the stream broke off: {type(e).__name__}: {e or 'no detail'}") from e
        except RemoteError as e:
            self.breaker.failure(str(e)[:80])
            raise
        finally:
            for cm in opened:
                cm.__exit__(None, None, None)
        yield StreamChunk(text="", finish_reason=finish or "stop", usage=usage, trace=self._trace(remote_trace))

    def loglikelihood(self, context: str, continuation: str) -> float:
        """log P(continuation | context), from the endpoint's echoed prompt logprobs."""
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        """For each (context, continuation): the summed log-probability and whether
        every continuation token was the endpoint's top choice (False where the
        endpoint returns no top logprobs). One request per pair."""

        out = []
        for context, continuation in pairs:
            body = {"model": self.model, "prompt": context + continuation, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
            data = self._post("/completions", body)
            try:
                lp = data["choices"][0].get("logprobs") or {}
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                raise RemoteError(f"{self._where('/completions')}: a malformed completion ({type(e).__name__}: {e})") from e
            offsets, token_lps = lp.get("text_offset"), lp.get("token_logprobs")
            if not offsets or token_lps is None:
                raise RemoteError(f"remote expert '{self.name}': the endpoint returned no echoed logprobs; it cannot score text")
            tokens, tops = lp.get("tokens") or [], lp.get("top_logprobs") or []
            start = len(context)
            total, greedy = 0.0, bool(tops)
            for i, (off, v) in enumerate(zip(offsets, token_lps)):
                if off < start or v is None:
                    continue
                total += float(v)
                top = tops[i] if i < len(tops) else None
                if not top or i >= len(tokens) or max(top, key=top.get) != tokens[i]:
                    greedy = False
            out.append((total, greedy))
        return out

    def close(self) -> None:
        self._client.close()


class _StatusFailure(Exception):
    """A non-200 answer, carried through the retry loop: the error to raise and the
    ``Retry-After`` the endpoint asked for (seconds), if any."""

    def __init__(self, error: RemoteError, resp: Any) -> None:
        super().__init__(str(error))
        self.error = error
        self.status = resp.status_code
        try:
            self.retry_after: float | None = float(resp.headers.get("retry-after"))
        except (TypeError, ValueError):
            self.retry_after = None


def _event_error(err: Any) -> str:
    return str(err.get("message")) if isinstance(err, dict) else str(err)


def _error_message(resp: Any) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message"))
        return str(err or resp.text[:200])
    except ValueError:
        return resp.text[:200]


class FallbackSystem(BaseSystem):
    """A remote expert that hands a request to another system when the endpoint
    fails (``fallback:`` in a spec). Only endpoint failures (``RemoteError``:
    unreachable, timed out, an HTTP error, garbage, an open circuit) fall back; a
    request the endpoint refuses as invalid (``RemoteRefused``) fails as it would have. A stream falls back only if the endpoint failed
    before its first chunk; after that the error is raised. The completion's
    trace records ``fallback_from`` and the endpoint's error."""

    def __init__(self, primary: RemoteExpert, fallback: Any) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = primary.name

    def _note(self, trace: dict[str, Any] | None, error: RemoteError) -> dict[str, Any]:
        return {**(trace or {}), "system": self.name, "fallback_from": self.primary.name, "fallback_error": str(error)}

    def generate(self, request: GenerationRequest) -> Completion:
        try:
            return self.primary.generate(request)
        except RemoteRefused:
            raise
        except RemoteError as e:
            c = self.fallback.generate(request)
            c.trace = self._note(c.trace, e)
            return c

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        chunks = self.primary.stream(request)
        try:
            first = next(chunks)
        except StopIteration:
            return
        except RemoteRefused:
            raise
        except RemoteError as e:
            for ch in self.fallback.stream(request):
                if ch.finish_reason is not None:
                    ch.trace = self._note(ch.trace, e)
                yield ch
            return
        yield first
        yield from chunks

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        from collab.system import scorer

        try:
            return self.primary.loglikelihood_batch(pairs, batch_size)
        except RemoteRefused:
            raise
        except RemoteError:
            return scorer(self.fallback, f"the fallback of '{self.name}'").loglikelihood_batch(pairs, batch_size)
