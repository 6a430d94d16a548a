"""The decoding loop every decoding-time method drives.

Two parts:

- ``Session``: one expert's KV cache over a batch of token sequences. It
  prefills left-padded prompts, then takes tokens (one per row, or several
  per row that someone else wrote, in one forward pass) and holds the
  next-token logits (and, when asked, hidden states) of every row. Position
  ids and attention masks are explicit, so rows of different lengths share a
  batch; ``grad=True`` keeps the autograd graph for training code.
- ``decode`` / ``generate`` / ``stream`` / ``generate_batch``: the loop. A
  rule chooses each next token from the driving expert's logits (greedy,
  sampling with temperature/top-p/seed, or a caller's own rule that may
  consult other experts); the loop owns EOS, stop strings (with hold-back
  while streaming), ``max_tokens``, finish reasons and usage.

A rule is any callable ``rule(logits, loop) -> token ids`` (one per row);
it may also have ``start(loop)``, called once after the prompts are
prefilled, and ``trace(row) -> dict``, merged into that row's completion
trace. ``loop.last`` holds the tokens chosen at the previous step (None at
the first), which is what a rule feeds its peers' sessions to catch them up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from collab.system import Completion, GenerationRequest, StreamChunk, Usage

if TYPE_CHECKING:
    import torch

    from collab.experts import Expert


class Session:
    """An expert's KV cache over a batch of sequences, fed token by token or chunk by chunk.

    After construction (the prefill) and after every ``feed``, ``logits``
    holds each row's next-token logits (B, V) in float32 and, with
    ``hidden_states=True``, ``hidden`` holds one (B, H) tensor per layer (the
    embeddings first) at each row's last token. ``lengths`` counts each row's
    tokens so far, pads excluded."""

    def __init__(
        self,
        expert: "Expert",
        prompts: Sequence[Sequence[int]],
        *,
        hidden_states: bool = False,
        grad: bool = False,
    ) -> None:
        import torch

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Session: every row needs at least one prompt token")
        from transformers import DynamicCache

        self.expert = expert
        self.hidden_states = hidden_states
        self.grad = grad
        self.device = expert.device
        self.batch = len(prompts)
        self.cache = DynamicCache(config=expert.model.config)
        self.mask = torch.zeros((self.batch, 0), dtype=torch.long, device=self.device)
        self.lengths = [0] * self.batch
        self.logits: torch.Tensor
        self.hidden: tuple[torch.Tensor, ...] | None = None
        self.chunk_logits: torch.Tensor | None = None
        self.feed(prompts)

    def feed(self, tokens: "Sequence[int] | Sequence[Sequence[int]] | torch.Tensor", *, all_logits: bool = False) -> "torch.Tensor":
        """Append tokens and return the new next-token logits (B, V).

        ``tokens`` is one id per row (a list or a (B,) tensor), or a list of
        per-row lists of any lengths (text another expert wrote), taken in one
        forward pass without recomputing the prefix. A row given no tokens
        keeps its logits. With ``all_logits`` ``chunk_logits`` holds (B, T, V),
        the logits after each fed token, right-aligned: row i's n_i tokens
        are its last n_i columns."""
        import torch

        rows = _as_rows(tokens, self.batch)
        width = max(len(r) for r in rows)
        if width == 0:
            return self.logits
        pad = self.expert.tokenizer.pad_token_id
        # left-pad each chunk: every row's last real token is the last column
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
        new_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        pos = torch.tensor(
            [[0] * (width - len(r)) + list(range(n, n + len(r))) for r, n in zip(rows, self.lengths)], dtype=torch.long
        )
        self.mask = torch.cat([self.mask, new_mask.to(self.device)], dim=1)
        out = self.expert.forward(
            ids,
            attention_mask=self.mask,
            position_ids=pos,
            cache=self.cache,
            output_hidden_states=self.hidden_states,
            grad=self.grad,
            logits_to_keep=0 if all_logits else 1,
        )
        logits = out.logits.float()
        last = logits[:, -1]
        fed = [len(r) > 0 for r in rows]
        if all(fed) or not hasattr(self, "logits"):
            self.logits = last
        else:
            keep = torch.tensor(fed, device=last.device)[:, None]
            self.logits = torch.where(keep, last, self.logits)
        self.chunk_logits = logits if all_logits else None
        if self.hidden_states:
            self.hidden = tuple(h[:, -1] for h in out.hidden_states)
        self.lengths = [n + len(r) for n, r in zip(self.lengths, rows)]
        return self.logits

    def crop(self, length: int) -> None:
        """Forget every token past the first ``length`` columns of the cache (all rows
        alike), e.g. drafted tokens a verifier rejected. The logits are not restored:
        feed the token that follows before reading them."""
        if length > self.mask.shape[1]:
            raise ValueError(f"Session.crop: {length} columns asked for, the cache holds {self.mask.shape[1]}")
        dropped = self.mask[:, length:].sum(dim=1).tolist()
        extra = self.mask.shape[1] - length
        if extra:
            self.cache.crop(-extra)  # transformers 5 takes the number of tokens to drop, negated
        self.mask = self.mask[:, :length]
        self.lengths = [n - int(d) for n, d in zip(self.lengths, dropped)]


def _as_rows(tokens: Any, batch: int) -> list[list[int]]:
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    tokens = list(tokens)
    if len(tokens) != batch:
        raise ValueError(f"Session.feed: expected tokens for {batch} rows, found {len(tokens)}")
    return [[int(t)] if isinstance(t, int) else [int(x) for x in t] for t in tokens]


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text``, or None."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


# ---------------------------------------------------------------------- rules
class Rule(Protocol):
    """Chooses the next token of every row from the driving expert's logits (B, V)."""

    def __call__(self, logits: "torch.Tensor", loop: "Loop") -> "torch.Tensor | Sequence[int]": ...


def greedy(logits: "torch.Tensor", loop: "Loop") -> "torch.Tensor":
    """The most likely token of every row."""
    return logits.argmax(dim=-1)


class Sampler:
    """Temperature and nucleus (top-p) sampling, as transformers' warpers do it, from
    a generator seeded per row: a seeded request samples the same tokens alone or in
    a batch."""

    def __init__(self, temperature: float, top_p: float = 1.0, seed: int | None = None) -> None:
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers: list[Any] = [TemperatureLogitsWarper(float(temperature))]
        if float(top_p) < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))
        self.seed = seed
        self.generator: Any = None

    def sample(self, logits: "torch.Tensor") -> int:
        """One token from a (V,) row of logits."""
        import torch

        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=logits.device).manual_seed(int(self.seed))
        scores = logits[None]
        for w in self.warpers:
            scores = w(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])


class RequestRule:
    """Each row as its request asks: greedy at temperature 0, else sampled."""

    def __init__(self, requests: Sequence[GenerationRequest]) -> None:
        self.samplers = [None if r.greedy else Sampler(r.temperature, r.top_p, r.seed) for r in requests]

    def __call__(self, logits: "torch.Tensor", loop: "Loop") -> "torch.Tensor | list[int]":
        if all(s is None for s in self.samplers):
            return logits.argmax(dim=-1)
        best = logits.argmax(dim=-1).tolist()
        return [b if s is None or loop.finished[i] else s.sample(logits[i]) for i, (s, b) in enumerate(zip(self.samplers, best))]


# ----------------------------------------------------------------------- loop
@dataclass
class _Row:
    """One request's progress: generated ids, text emitted so far, how it ended."""

    request: GenerationRequest
    prompt: list[int]
    stops: list[str]
    max_new: int
    eos: frozenset[int]
    tokenizer: Any
    gen: list[int] = field(default_factory=list)
    emitted: int = 0
    text: str = ""
    finish: str | None = None

    @property
    def hold(self) -> int:
        # a stop string could still be completing in the last len(stop) - 1 characters
        return max((len(s) for s in self.stops), default=1) - 1

    def push(self, token: int) -> str:
        """Take one chosen token; return the text now safe to show."""
        if token in self.eos:
            self.finish = "stop"
            return self._flush()
        self.gen.append(token)
        self.text = self.tokenizer.decode(self.gen, skip_special_tokens=True)
        cut = first_stop(self.text, self.stops)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
            return self._flush()
        if len(self.gen) >= self.max_new:
            self.finish = "length"
            return self._flush()
        safe = len(self.text) - self.hold
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # a character still being spelt out in bytes
            safe -= 1
        if safe <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : safe], safe
        return delta

    def _flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


@dataclass
class Loop:
    """What a rule sees: the driving expert and its session, the requests, each
    row's prompt and generated ids, which rows are done, the step number and the
    tokens chosen at the previous step (None at the first)."""

    expert: "Expert"
    session: Session
    requests: Sequence[GenerationRequest]
    prompts: list[list[int]]
    rows: list[_Row]
    step: int = 0
    last: list[int] | None = None

    @property
    def generated(self) -> list[list[int]]:
        return [r.gen for r in self.rows]

    @property
    def finished(self) -> list[bool]:
        return [r.finish is not None for r in self.rows]


@dataclass
class Event:
    """What one step produced for one row: new text, and the completion once the row ends."""

    row: int
    text: str
    completion: Completion | None = None


def decode(
    expert: "Expert",
    requests: Sequence[GenerationRequest],
    rule: Rule | None = None,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    trace: Callable[[GenerationRequest], dict[str, Any]] | None = None,
) -> Iterator[list[Event]]:
    """Run the loop over a batch of requests on ``expert``; yield each step's events.

    ``rule`` chooses the tokens (default: each request's own greedy or sampling
    settings); ``prompts`` are already-encoded prompt ids; ``trace`` builds the
    base of each completion's trace (default: the expert's)."""
    prompt_ids = [list(p) for p in prompts] if prompts is not None else [expert.encode(r) for r in requests]
    eos = frozenset(expert.eos_token_ids)
    rows = [
        _Row(r, ids, expert.stops_for(r), expert.max_new_tokens(r, len(ids)), eos, expert.tokenizer)
        for r, ids in zip(requests, prompt_ids)
    ]
    session = Session(expert, prompt_ids)
    rule = rule or RequestRule(requests)
    loop = Loop(expert, session, requests, prompt_ids, rows)
    if hasattr(rule, "start"):
        rule.start(loop)
    base_trace = trace or expert.trace_for
    pad = expert.tokenizer.pad_token_id
    while True:
        chosen = rule(session.logits, loop)
        chosen = chosen.tolist() if hasattr(chosen, "tolist") else [int(t) for t in chosen]
        events = []
        for i, (row, token) in enumerate(zip(rows, chosen)):
            if row.finish is not None:
                continue
            text = row.push(int(token))
            done = None
            if row.finish is not None:
                tr = base_trace(row.request)
                if hasattr(rule, "trace"):
                    tr.update(rule.trace(i))
                done = Completion(text=row.text, finish_reason=row.finish, usage=Usage(len(row.prompt), len(row.gen)), trace=tr)
            if text or done is not None:
                events.append(Event(i, text, done))
        yield events
        if all(r.finish is not None for r in rows):
            return
        loop.last = [t if r.finish is None else pad for t, r in zip(chosen, rows)]
        loop.step += 1
        session.feed(loop.last)


def generate_batch(
    expert: "Expert", requests: Sequence[GenerationRequest], rule: Rule | None = None, **kw: Any
) -> list[Completion]:
    """Completions for ``requests`` decoded together in one batch, in order."""
    done: list[Completion | None] = [None] * len(requests)
    for events in decode(expert, requests, rule, **kw):
        for e in events:
            if e.completion is not None:
                done[e.row] = e.completion
    return [c for c in done if c is not None]


def generate(expert: "Expert", request: GenerationRequest, rule: Rule | None = None, **kw: Any) -> Completion:
    """One completion through the loop."""
    return generate_batch(expert, [request], rule, **kw)[0]


def stream(expert: "Expert", request: GenerationRequest, rule: Rule | None = None, **kw: Any) -> Iterator[StreamChunk]:
    """Stream one completion; the last chunk carries finish reason, usage and trace."""
    for events in decode(expert, [request], rule, **kw):
        for e in events:
            if e.completion is None:
                yield StreamChunk(text=e.text)
            else:
                c = e.completion
                yield StreamChunk(text=e.text, finish_reason=c.finish_reason, usage=c.usage, trace=c.trace)
