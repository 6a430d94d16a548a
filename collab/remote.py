"""Experts behind an OpenAI-compatible HTTP endpoint (vLLM, SGLang, another
``collab serve``), answering through the same System and Scorer protocols as
local experts."""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from collab.errors import RemoteError
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk, Usage


class RemoteExpert(BaseSystem):
    """An expert behind an OpenAI-compatible HTTP endpoint (vLLM, SGLang, another ``collab serve``).

    ``url`` is the API base (``http://host:port/v1``). Chat requests go to
    ``/chat/completions``, raw prompts to ``/completions``; streaming reads the
    server-sent events. ``loglikelihood`` uses ``/completions`` with
    ``echo`` and ``logprobs``, which vLLM and collab serve support.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, name: str | None = None, timeout: float = 120.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.name = name or model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

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

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx


        try:
            resp = self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: {type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: HTTP {resp.status_code}: {_error_message(resp)}")
        return resp.json()

    def generate(self, request: GenerationRequest) -> Completion:
        path, body = self._body(request, stream=False)
        data = self._post(path, body)
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = data.get("usage") or {}
        return Completion(
            text=text or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
            trace=self._trace(data.get("collab")),
        )

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        import httpx


        path, body = self._body(request, stream=True)
        finish: str | None = None
        usage = Usage()
        remote_trace = None
        try:
            with self._client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: HTTP {resp.status_code}: {_error_message(resp)}")
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if event.get("usage"):
                        u = event["usage"]
                        usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
                    remote_trace = event.get("collab") or remote_trace
                    for choice in event.get("choices") or []:
                        delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                        if delta:
                            yield StreamChunk(text=delta)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
        except httpx.HTTPError as e:
            raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: {type(e).__name__}: {e}") from e
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
            lp = data["choices"][0].get("logprobs") or {}
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
    unreachable, timed out, an HTTP error) fall back; a request the user got
    wrong fails as it would have. A stream falls back only if the endpoint failed
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
        except RemoteError:
            return scorer(self.fallback, f"the fallback of '{self.name}'").loglikelihood_batch(pairs, batch_size)
