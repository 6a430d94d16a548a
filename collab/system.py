"""Requests, completions, traces and the System protocol.

Everything that can answer a prompt is a System: a single expert, a router over
experts, a co-decoder, a latent mixture. The evaluation runner, the CLI and the
server only speak this protocol. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from collab.errors import RequestError

Message = dict[str, str]
_ROLES = ("system", "user", "assistant")


@dataclass
class GenerationRequest:
    """One generation request, as the OpenAI API would phrase it.

    Exactly one of ``messages`` (chat, rendered with the system's chat template)
    or ``prompt`` (raw text continued as is) must be given. ``temperature == 0``
    means greedy decoding, which is deterministic; with ``temperature > 0`` the
    same ``seed`` gives the same sample on the same system.
    """

    messages: list[Message] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise RequestError("request: give exactly one of 'messages' or 'prompt'")
        if self.messages is not None:
            if not isinstance(self.messages, list) or not self.messages:
                raise RequestError("request.messages: expected a non-empty list of {role, content}")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                    raise RequestError(
                        f"request.messages[{i}]: expected {{'role': one of {_ROLES}, 'content': str}}, found {m!r}"
                    )
        elif not isinstance(self.prompt, str):
            raise RequestError(f"request.prompt: expected a string, found {type(self.prompt).__name__}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"request.max_tokens: expected an integer >= 1, found {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 10.0):
            raise RequestError(f"request.temperature: expected 0 <= t <= 10, found {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise RequestError(f"request.top_p: expected 0 < p <= 1, found {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0

    @classmethod
    def chat(cls, content: str, **kwargs: Any) -> "GenerationRequest":
        """A one-turn chat request: ``GenerationRequest.chat("What is 2+2?")``."""
        return cls(messages=[{"role": "user", "content": content}], **kwargs)

    def text_for_routing(self, last_turn_only: bool = False) -> str:
        """The text a router should look at: the whole conversation, or the last user turn."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        if last_turn_only:
            users = [m["content"] for m in self.messages if m["role"] == "user"]
            return users[-1] if users else self.messages[-1]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class Completion:
    """What a system answered, how it stopped, what it cost and what it did.

    ``finish_reason`` is ``"stop"`` (end of sequence or a stop string) or
    ``"length"`` (``max_tokens`` reached). ``trace`` records the system's
    decisions: for an expert its name and prompt format, for a router the
    routed expert and every expert's predicted score, and so on.
    """

    text: str
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)
    trace: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usage"] = self.usage.to_dict()
        return d


@dataclass
class StreamChunk:
    """One piece of a streamed answer. The last chunk carries ``finish_reason``, usage and trace."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    trace: dict[str, Any] | None = None


@runtime_checkable
class System(Protocol):
    """Anything that answers prompts. See DESIGN.md."""

    name: str

    def generate(self, request: GenerationRequest) -> Completion: ...

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]: ...


class BaseSystem:
    """Shared behaviour for systems: batched generation falls back to a loop,
    and a stream can be collected into a completion."""

    name: str = "system"

    def generate(self, request: GenerationRequest) -> Completion:  # pragma: no cover - abstract
        raise NotImplementedError

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        c = self.generate(request)
        yield StreamChunk(text=c.text, finish_reason=c.finish_reason, usage=c.usage, trace=c.trace)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return [self.generate(r) for r in requests]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def collect_stream(chunks: Iterator[StreamChunk]) -> Completion:
    """Join a stream into the Completion that ``generate`` would have returned."""
    parts: list[str] = []
    last: StreamChunk | None = None
    for ch in chunks:
        parts.append(ch.text)
        last = ch
    if last is None:
        return Completion(text="", finish_reason="stop")
    return Completion(
        text="".join(parts),
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(),
        trace=last.trace or {},
    )


@runtime_checkable
class Scorer(Protocol):
    """A System that can score text: the summed log-probability of each
    continuation given its context, and whether it is the greedy one (as
    lm-eval's ``loglikelihood`` returns). Experts, local and remote, are Scorers;
    a router or a co-decoder is one only where it defines these."""

    name: str

    def loglikelihood(self, context: str, continuation: str) -> float: ...

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]: ...


@runtime_checkable
class RollingScorer(Protocol):
    """A system that scores a whole text in windows of its context (perplexity)."""

    def loglikelihood_rolling(self, text: str) -> float: ...


@runtime_checkable
class RendersRequests(Protocol):
    """A system that can show the exact text its model is given for a request
    (``Expert.render``: the chat template applied), so that an answer can be scored
    in the context it was generated in."""

    def render(self, request: GenerationRequest) -> str: ...


@runtime_checkable
class BatchSystem(Protocol):
    """A system that answers several requests at once (every ``BaseSystem`` does)."""

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]: ...


def generate_all(system: System, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """``system``'s completions of ``requests``: batched where the system batches."""
    if isinstance(system, BatchSystem) and len(requests) > 1:
        return system.generate_batch(requests)
    return [system.generate(r) for r in requests]


def scorer(system: object, purpose: str) -> Scorer:
    """``system`` as a Scorer, or a RequestError naming it and what needed the scores."""
    if not isinstance(system, Scorer):
        name = getattr(system, "name", type(system).__name__)
        raise RequestError(f"system '{name}' cannot score text (it has no loglikelihood), which {purpose} needs")
    return system
