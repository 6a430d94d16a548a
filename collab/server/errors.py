"""The server's error contract: every failure is ``{"error": {"message", "type",
"param", "code"}}`` with one of these statuses.

=====  ==========================================================  ======================
400    a well-formed request with an invalid value, malformed JSON  invalid_request_error
401    missing or wrong bearer key                                  authentication_error
404    unknown model or path                                        not_found_error
413    prompt over the context window, or a body over the limit     invalid_request_error
422    a body that does not match the schema (missing, wrong type)  invalid_request_error
429    the model's queue is full                                    rate_limit_error
500    an expert failed (the message names it)                      server_error
503    the server is still loading its experts                      service_unavailable
=====  ==========================================================  ======================
"""

from __future__ import annotations

from typing import Any

from collab.errors import CollabError, ContextLengthError, RemoteError, RequestError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with its HTTP status and OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"), "param": self.param, "code": self.code}}


class QueueFull(CollabError):
    """A model's queue holds as many requests as it may; the client should retry later."""


class ExpertFailed(CollabError):
    """A local expert raised while decoding; the message names the expert."""


def api_error(exc: BaseException, model: str | None = None) -> APIError:
    """The APIError a generation failure is reported as."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(413, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), code="invalid_value")
    from collab.remote import RemoteRefused

    if isinstance(exc, RemoteRefused):  # the endpoint behind a remote expert refused the request as invalid
        return APIError(413 if exc.status == 413 else 400, str(exc), code="context_length_exceeded" if exc.status == 413 else "invalid_value")
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, (ExpertFailed, RemoteError)):
        return APIError(500, str(exc), code="expert_failed")
    what = f"model '{model}'" if model else "the model"
    return APIError(500, f"{what} failed: {type(exc).__name__}: {exc}", code="expert_failed")
