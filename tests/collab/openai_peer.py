"""A minimal OpenAI-compatible HTTP peer for testing RemoteExpert on loopback.

It serves a real (tiny) Expert through /v1/chat/completions and /v1/completions,
plain and streamed (server-sent events ending in ``data: [DONE]``), the way vLLM
or ``collab serve`` answer. It is a test peer, not collab's server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from collab.system import GenerationRequest


def make_app(expert: Any, model_name: str, api_key: str | None = None) -> Any:
    app = FastAPI()

    def check_key(request: Request) -> JSONResponse | None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "invalid api key", "type": "auth", "param": None, "code": "401"}}, status_code=401)
        return None

    def to_request(body: dict[str, Any], chat: bool) -> GenerationRequest:
        return GenerationRequest(
            messages=body["messages"] if chat else None,
            prompt=None if chat else body["prompt"],
            max_tokens=body.get("max_tokens", 16),
            temperature=body.get("temperature", 0.0),
            top_p=body.get("top_p", 1.0),
            stop=body.get("stop") or [],
            seed=body.get("seed"),
        )

    def sse(req: GenerationRequest, chat: bool) -> Iterator[str]:
        for ch in expert.stream(req):
            choice: dict[str, Any] = {"index": 0, "finish_reason": ch.finish_reason}
            if chat:
                choice["delta"] = {"content": ch.text}
            else:
                choice["text"] = ch.text
            event: dict[str, Any] = {"object": "chunk", "model": model_name, "choices": [choice]}
            if ch.usage is not None:
                event["usage"] = ch.usage.to_dict()
                event["collab"] = ch.trace
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool) -> Any:
        denied = check_key(request)
        if denied is not None:
            return denied
        body = await request.json()
        if body.get("model") != model_name:
            return JSONResponse({"error": {"message": f"model '{body.get('model')}' not found", "type": "not_found", "param": "model", "code": "404"}}, status_code=404)
        if not chat and body.get("echo") and body.get("max_tokens") == 0:
            return JSONResponse(echo_logprobs(body["prompt"]))
        req = to_request(body, chat)
        if body.get("stream"):
            return StreamingResponse(sse(req, chat), media_type="text/event-stream")
        c = expert.generate(req)
        choice: dict[str, Any] = {"index": 0, "finish_reason": c.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        return {"object": "completion", "model": model_name, "choices": [choice], "usage": c.usage.to_dict(), "collab": c.trace}

    def echo_logprobs(prompt: str) -> dict[str, Any]:
        import torch

        enc = expert.tokenizer(prompt, return_offsets_mapping=True)
        ids = enc.input_ids
        with torch.no_grad():
            logp = torch.log_softmax(expert.model(torch.tensor([ids])).logits[0].float(), -1)
        token_lps: list[float | None] = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        offsets = [int(s) for s, _ in enc.offset_mapping]
        return {"choices": [{"text": prompt, "logprobs": {"token_logprobs": token_lps, "text_offset": offsets}}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    return app


class Peer:
    """Runs ``make_app`` under uvicorn in a thread on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Peer":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("test peer did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
