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

A rule may also choose several tokens for a row in one step (a list of ids
for that row, e.g. the drafted tokens a verifier accepted plus its own next
one): the loop takes them in order, as if chosen one step each, until the row
ends. The loop then feeds the driving session every chosen token it has not
seen yet, in one pass; a rule that sets ``feeds_session = True`` keeps the
driving session current itself (speculative decoding feeds the last chosen
token together with the next draft) and the loop does not feed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from collab.system import Completion, GenerationRequest, StreamChunk, Usage

if TYPE_CHECKING:
    import torch


class DecodingExpert(Protocol):
    """What the loop uses of an expert: ``collab.experts.Expert`` is one, and so is any
    object that renders, tokenises and runs a causal LM the same way (an adapter
    bank's per-adapter view, for instance). The loop depends on this, not on the
    experts module, so the dependency points one way."""

    name: str
    model: Any
    tokenizer: Any
    eos_token_ids: list[int]

    @property
    def device(self) -> "torch.device": ...

    def encode(self, request: GenerationRequest) -> list[int]: ...

    def stops_for(self, request: GenerationRequest) -> list[str]: ...

    def trace_for(self, request: GenerationRequest) -> dict[str, Any]: ...

    def max_new_tokens(self, request: GenerationRequest, prompt_len: int) -> int: ...

    def forward(
        self,
        input_ids: "torch.Tensor",
        attention_mask: "torch.Tensor | None" = None,
        cache: Any = None,
        output_hidden_states: bool = False,
        use_cache: bool = True,
        *,
        position_ids: "torch.Tensor | None" = None,
        grad: bool = False,
        logits_to_keep: int = 0,
    ) -> Any: ...


class Session:
    """An expert's KV cache over a batch of sequences, fed token by token or chunk by chunk.

    After construction (the prefill) and after every ``feed``, ``logits``
    holds each row's next-token logits (B, V) in float32 and, with
    ``hidden_states=True``, ``hidden`` holds one (B, H) tensor per layer (the
    embeddings first) at each row's last token. ``lengths`` counts each row's
    tokens so far, pads excluded."""

    def __init__(
        self,
        expert: "DecodingExpert",
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

    def drop(self, counts: Sequence[int]) -> None:
        """Forget the last ``counts[i]`` tokens of each row i (the drafted tokens a
        verifier rejected, a different number per row). Their cache columns are masked
        out, and trailing columns no row uses any more are cropped, so the next tokens
        take the positions the dropped ones had. The logits are not restored: feed the
        token that follows before reading them."""
        if len(counts) != self.batch:
            raise ValueError(f"Session.drop: expected counts for {self.batch} rows, found {len(counts)}")
        if not any(counts):
            return
        mask = self.mask.clone()
        for i, n in enumerate(counts):
            if n < 0 or n > self.lengths[i]:
                raise ValueError(f"Session.drop: row {i} holds {self.lengths[i]} tokens, cannot drop {n}")
            if n:
                cols = mask[i].nonzero().flatten()
                mask[i, cols[len(cols) - n :]] = 0
        self.mask = mask
        self.lengths = [m - int(n) for m, n in zip(self.lengths, counts)]
        used = mask.any(dim=0).nonzero().flatten()
        self.crop(int(used[-1]) + 1 if len(used) else 0)  # the cropped columns are all masked: lengths stay

    @property
    def can_extend(self) -> bool:
        """Whether rows can join this session (``extend``): every cache layer holds
        the whole sequence. A sliding-window layer (Gemma-3's local attention) keeps
        only its window, which rows of other lengths cannot be aligned with."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def extend(self, prompts: Sequence[Sequence[int]]) -> None:
        """Prefill ``prompts`` as new rows after the current ones (continuous batching):
        their KV caches are computed in a pass of their own, then both sets of rows are
        left-padded to one width and joined; no row is recomputed. The new rows'
        next-token logits (and hidden states) follow the old rows'."""
        import torch

        if not self.can_extend:
            raise ValueError(f"Session.extend: expert '{self.expert.name}' keeps a sliding-window cache; rows cannot join a running batch")
        new = Session(self.expert, prompts, hidden_states=self.hidden_states, grad=self.grad)
        width = max(self.mask.shape[1], new.mask.shape[1])

        def left_pad(x: "torch.Tensor", dim: int) -> "torch.Tensor":
            missing = width - x.shape[dim]
            if not missing:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for mine, theirs in zip(self.cache.layers, new.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, -2), left_pad(theirs.keys, -2)], dim=0)
            mine.values = torch.cat([left_pad(mine.values, -2), left_pad(theirs.values, -2)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(new.mask, 1)], dim=0)
        self.lengths = self.lengths + new.lengths
        self.batch += new.batch
        self.logits = torch.cat([self.logits, new.logits], dim=0)
        if self.hidden is not None and new.hidden is not None:
            self.hidden = tuple(torch.cat([a, b], dim=0) for a, b in zip(self.hidden, new.hidden))
        self.chunk_logits = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), e.g. to drop finished requests from a
        running batch; cache columns no kept row uses any more are freed."""
        import torch

        if any(not 0 <= i < self.batch for i in rows):
            raise ValueError(f"Session.keep: rows {list(rows)} out of range for a batch of {self.batch}")
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.mask = self.mask[index]
        self.lengths = [self.lengths[i] for i in rows]
        self.batch = len(rows)
        self.logits = self.logits[index]
        if self.hidden is not None:
            self.hidden = tuple(h[index] for h in self.hidden)
        self.chunk_logits = None
        used = self.mask.any(dim=0).nonzero().flatten()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start and self.can_extend:  # columns every kept row masks out, at the left: free them
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]


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
    """Chooses the next token of every row from the driving expert's logits (B, V):
    one id per row, or for some rows a list of ids taken in order (see the module's
    docstring for ``feeds_session``)."""

    def __call__(self, logits: "torch.Tensor", loop: "Loop") -> "torch.Tensor | Sequence[int] | Sequence[Sequence[int]]": ...


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

    def probs(self, logits: "torch.Tensor") -> "torch.Tensor":
        """The distribution tokens are sampled from: (..., V) logits warped by
        temperature and top-p, softmaxed, row by row."""
        import torch

        scores = logits.reshape(-1, logits.shape[-1])
        for w in self.warpers:
            scores = w(None, scores)
        return torch.softmax(scores, dim=-1).reshape(logits.shape)

    def rng(self, device: "torch.device") -> Any:
        """The row's generator (seeded on first use), or None when unseeded."""
        import torch

        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(int(self.seed))
        return self.generator

    def sample(self, logits: "torch.Tensor") -> int:
        """One token from a (V,) row of logits."""
        return self.draw(self.probs(logits))

    def draw(self, probs: "torch.Tensor") -> int:
        """One token from a (V,) distribution, with the row's generator."""
        import torch

        return int(torch.multinomial(probs[None], 1, generator=self.rng(probs.device))[0, 0])


class RequestRule:
    """Each row as its request asks: greedy at temperature 0, else sampled. Rows may
    join (``admit``) and leave (``keep``) a running batch."""

    def __init__(self, requests: Sequence[GenerationRequest]) -> None:
        self.samplers = [None if r.greedy else Sampler(r.temperature, r.top_p, r.seed) for r in requests]

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        """New rows after the current ones."""
        self.samplers += RequestRule(requests).samplers

    def keep(self, rows: Sequence[int]) -> None:
        """Only ``rows`` go on, in that order."""
        self.samplers = [self.samplers[i] for i in rows]

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
    tokens chosen at the previous step (None at the first; a row's last one where
    the rule chose several)."""

    expert: "DecodingExpert"
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
    request: GenerationRequest | None = None


def decode(
    expert: "DecodingExpert",
    requests: Sequence[GenerationRequest],
    rule: Rule | None = None,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    trace: Callable[[GenerationRequest], dict[str, Any]] | None = None,
    admit: "Callable[[Loop], Sequence[tuple[GenerationRequest, Sequence[int]]]] | None" = None,
) -> Iterator[list[Event]]:
    """Run the loop over a batch of requests on ``expert``; yield each step's events.

    ``rule`` chooses the tokens (default: each request's own greedy or sampling
    settings); ``prompts`` are already-encoded prompt ids; ``trace`` builds the
    base of each completion's trace (default: the expert's).

    Continuous batching: with ``admit``, finished rows leave the batch after each
    step, and ``admit(loop)`` returns (request, prompt ids) pairs that join it
    (prefilled in a pass of their own, appended after the running rows); the
    loop ends when no row is left and ``admit`` returns none. Row numbers then
    change between steps: an event's ``request`` says whose it is. The rule must
    follow with ``admit(requests)`` and ``keep(rows)`` (``RequestRule`` does), and
    the session must allow it (``Session.can_extend``)."""
    requests = list(requests)
    prompt_ids = [list(p) for p in prompts] if prompts is not None else [expert.encode(r) for r in requests]
    eos = frozenset(expert.eos_token_ids)

    def make_row(r: GenerationRequest, ids: list[int]) -> _Row:
        return _Row(r, ids, expert.stops_for(r), expert.max_new_tokens(r, len(ids)), eos, expert.tokenizer)

    rows = [make_row(r, ids) for r, ids in zip(requests, prompt_ids)]
    session = Session(expert, prompt_ids)
    rule = rule or RequestRule(requests)
    if admit is not None:
        if not (hasattr(rule, "admit") and hasattr(rule, "keep")):
            raise TypeError(f"decode: admit= needs a rule with admit() and keep(); {type(rule).__name__} has not")
        if not session.can_extend:
            raise ValueError(f"decode: expert '{expert.name}' keeps a sliding-window cache; rows cannot join a running batch")
    loop = Loop(expert, session, requests, prompt_ids, rows)
    if hasattr(rule, "start"):
        rule.start(loop)
    base_trace = trace or expert.trace_for
    pad = expert.tokenizer.pad_token_id
    feeds = bool(getattr(rule, "feeds_session", False))
    while True:
        chosen = _per_row(rule(session.logits, loop))
        events = []
        for i, (row, tokens) in enumerate(zip(rows, chosen)):
            if row.finish is not None:
                continue
            if not tokens:
                raise ValueError(f"decode: the rule chose no token for row {i}")
            text = ""
            for token in tokens:
                text += row.push(token)
                if row.finish is not None:
                    break
            done = None
            if row.finish is not None:
                tr = base_trace(row.request)
                if hasattr(rule, "trace"):
                    tr.update(rule.trace(i))
                done = Completion(text=row.text, finish_reason=row.finish, usage=Usage(len(row.prompt), len(row.gen)), trace=tr)
            if text or done is not None:
                events.append(Event(i, text, done, row.request))
        yield events
        if admit is None and all(r.finish is not None for r in rows):
            return
        loop.last = [t[-1] if r.finish is None else pad for t, r in zip(chosen, rows)]
        loop.step += 1
        if admit is not None:
            going = [i for i, r in enumerate(rows) if r.finish is None]
            if len(going) < len(rows):
                session.keep(going)
                rule.keep(going)  # type: ignore[union-attr]
                rows[:] = [rows[i] for i in going]
                requests[:] = [requests[i] for i in going]
                prompt_ids[:] = [prompt_ids[i] for i in going]
                chosen = [chosen[i] for i in going]
                loop.last = [loop.last[i] for i in going]
        if not feeds and rows:  # a rule with feeds_session keeps the session current itself
            if all(len(t) == 1 for t, r in zip(chosen, rows) if r.finish is None):
                session.feed(loop.last)
            else:  # several tokens for some row: catch the session up on all it has not seen, in one pass
                session.feed([r.gen[n - len(r.prompt) :] if r.finish is None else [] for r, n in zip(rows, session.lengths)])
        if admit is not None:
            joining = list(admit(loop))
            if joining:
                new_requests = [r for r, _ in joining]
                new_ids = [list(ids) for _, ids in joining]
                if rows:
                    session.extend(new_ids)
                else:
                    session = loop.session = Session(expert, new_ids)
                rule.admit(new_requests)  # type: ignore[union-attr]
                rows += [make_row(r, ids) for r, ids in zip(new_requests, new_ids)]
                requests += new_requests
                prompt_ids += new_ids
                loop.last = list(loop.last) + [pad] * len(joining)
            if not rows:
                return


def _per_row(chosen: Any) -> list[list[int]]:
    """A rule's choice as a list of token ids per row (one id, or several in order)."""
    if hasattr(chosen, "tolist"):
        chosen = chosen.tolist()
    return [[int(x) for x in t] if isinstance(t, (list, tuple)) else [int(t)] for t in chosen]


def generate_batch(
    expert: "DecodingExpert", requests: Sequence[GenerationRequest], rule: Rule | None = None, **kw: Any
) -> list[Completion]:
    """Completions for ``requests`` decoded together in one batch, in order."""
    done: list[Completion | None] = [None] * len(requests)
    for events in decode(expert, requests, rule, **kw):
        for e in events:
            if e.completion is not None:
                done[e.row] = e.completion
    return [c for c in done if c is not None]


def generate(expert: "DecodingExpert", request: GenerationRequest, rule: Rule | None = None, **kw: Any) -> Completion:
    """One completion through the loop."""
    return generate_batch(expert, [request], rule, **kw)[0]


def stream(expert: "DecodingExpert", request: GenerationRequest, rule: Rule | None = None, **kw: Any) -> Iterator[StreamChunk]:
    """Stream one completion; the last chunk carries finish reason, usage and trace."""
    for events in decode(expert, [request], rule, **kw):
        for e in events:
            if e.completion is None:
                yield StreamChunk(text=e.text)
            else:
                c = e.completion
                yield StreamChunk(text=e.text, finish_reason=c.finish_reason, usage=c.usage, trace=c.trace)
