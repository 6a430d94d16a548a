"""Dynamic batching: concurrent requests to one local expert decoded together.

Each local expert gets an ``ExpertBatcher``: a bounded queue and one worker
thread. The worker takes the oldest waiting request, waits up to
``max_wait_ms`` (counted from that request's arrival, or from the end of the
previous batch if later) for more, then decodes
up to ``max_batch`` of them in one batch through ``collab.decode.decode``,
handing each row's text to its request as soon as the loop releases it.

Continuous batching (the default where the expert's KV cache allows it, i.e.
no sliding-window layers): between two steps of a running batch, finished
rows leave it and waiting requests join it, prefilled in a pass of their own,
up to ``max_batch`` rows; so a request never waits for a whole batch to end.
Otherwise (Gemma-3's local attention, or ``continuous=False``) a batch runs
until its last row ends.

A request whose client went away is given EOS at the next step, which ends its
row; a batch whose rows are all gone stops at once (when nothing waits).

A composite system (a router over experts, a remote expert with a local
fallback) reaches its local experts through ``BatchedExpert`` views of the same
batchers, so routed requests share batches with direct ones.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from collab.server.errors import ExpertFailed, QueueFull
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk, collect_stream

if TYPE_CHECKING:
    from collab.experts import Expert
    from collab.server.metrics import Metrics

log = logging.getLogger("collab.server")

#: What a request is handed: ("delta", text), ("done", Completion) or ("error", exception).
Event = tuple[str, Any]

#: The request a worker thread is answering (``running``), so that the experts a
#: composite system calls from that thread notice when its client goes away.
_current = threading.local()


class Cancelled(BaseException):
    """The client went away. A BaseException, so that a system's ``except Exception``
    (a router trying its next-ranked expert) lets it through."""


class running:
    """``with running(handle):`` marks ``handle`` (anything with ``cancelled``) as the
    request this thread answers; ``BatchedExpert`` calls made meanwhile stop when it is cancelled."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __enter__(self) -> None:
        self.previous = getattr(_current, "handle", None)
        _current.handle = self.handle

    def __exit__(self, *exc: Any) -> None:
        _current.handle = self.previous


class Ticket:
    """One request's place in a batcher: its prompt ids, where its events go, and
    whether its client still wants them."""

    def __init__(self, request: GenerationRequest, prompt: list[int], deliver: Callable[[Event], None], deltas: bool) -> None:
        self.request = request
        self.prompt = prompt
        self.deliver = deliver
        self.deltas = deltas
        self.enqueued = time.monotonic()
        self.queue_wait: float | None = None
        self.cancelled = False
        self.finished = False
        self.started = False  # some text was handed out, so the request cannot be redone

    def cancel(self) -> None:
        """The client went away: stop decoding this request (at the next step)."""
        self.cancelled = True

    def send(self, kind: str, value: Any) -> None:
        if kind == "delta":
            if not self.deltas:
                return
            self.started = True
        else:
            self.finished = True
        try:
            self.deliver((kind, value))
        except Exception:  # noqa: BLE001 - the receiver is gone (its event loop closed)
            self.cancelled = True


class _CancelRule:
    """The requests' own token choice, except that a cancelled row is given EOS, which
    ends it. ``tickets`` maps each row's request (by identity) to its ticket."""

    def __init__(self, inner: Any, tickets: dict[int, Ticket], eos: int | None) -> None:
        self.inner = inner
        self.tickets = tickets
        self.eos = eos

    def __call__(self, logits: Any, loop: Any) -> Any:
        chosen = self.inner(logits, loop)
        gone = [self.tickets[id(r)].cancelled for r in loop.requests]
        if self.eos is None or not any(gone):
            return chosen
        chosen = chosen.tolist() if hasattr(chosen, "tolist") else list(chosen)
        return [self.eos if g else c for c, g in zip(chosen, gone)]

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        self.inner.admit(requests)

    def keep(self, rows: Sequence[int]) -> None:
        self.inner.keep(rows)


class ExpertBatcher:
    """A bounded queue of requests to ``expert`` and the thread that decodes them in batches."""

    def __init__(
        self,
        expert: "Expert",
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        metrics: "Metrics | None" = None,
        continuous: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"ExpertBatcher: expected max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; found {max_batch}, {max_queue}, {max_wait_ms}")
        self.expert = expert
        self.name = expert.name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self.continuous = continuous and _can_join(expert)
        self._pending: deque[Ticket] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._idle_since = 0.0  # when the last batch ended
        self._thread = threading.Thread(target=self._run, name=f"collab-batch-{expert.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the queue
    def submit(self, request: GenerationRequest, deliver: Callable[[Event], None], *, deltas: bool = True) -> Ticket:
        """Queue ``request``; its events go to ``deliver`` (from the worker thread).
        Raises ContextLengthError for a prompt that does not fit and QueueFull when
        ``max_queue`` requests already wait."""
        prompt = self.expert.encode(request)
        # a copy of its own: the loop tells rows apart by their request's identity, and the
        # n choices of one client request are n rows
        ticket = Ticket(copy.copy(request), prompt, deliver, deltas)
        with self._cv:
            if self._stopping:
                raise ExpertFailed(f"expert '{self.name}': the server is shutting down")
            waiting = sum(not t.cancelled for t in self._pending)
            if waiting >= self.max_queue:
                raise QueueFull(f"expert '{self.name}': {waiting} requests already queued (--max-queue {self.max_queue}); retry later")
            self._pending.append(ticket)
            self._gauge()
            self._cv.notify()
        return ticket

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending), expert=self.name)

    def _take(self) -> list[Ticket]:
        """The next batch: wait for a request, then up to ``max_wait`` after its arrival for more."""
        with self._cv:
            while True:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return []
                # Wait from the oldest request's arrival, or from the end of the last batch if
                # later: the clients that batch just answered are about to send their next
                # requests, and waiting for them keeps concurrent clients in one batch instead
                # of splitting them into groups that take turns.
                deadline = max(self._pending[0].enqueued, self._idle_since) + self.max_wait
                while len(self._pending) < self.max_batch and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch: list[Ticket] = []
                while self._pending and len(batch) < self.max_batch:
                    t = self._pending.popleft()
                    if not t.cancelled:
                        batch.append(t)
                self._gauge()
                if batch:
                    return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                break
            try:
                self._decode(batch)
            except BaseException as e:  # noqa: BLE001 - the worker must outlive any batch
                log.exception("expert '%s': batch of %d failed", self.name, len(batch))
                for t in batch:
                    if not t.finished:
                        t.send("error", ExpertFailed(f"expert '{self.name}' failed: {type(e).__name__}: {e}"))
            self._idle_since = time.monotonic()
        with self._cv:  # shutting down: fail whatever still waits
            left, self._pending = list(self._pending), deque()
        for t in left:
            t.send("error", ExpertFailed(f"expert '{self.name}': the server is shutting down"))

    # ------------------------------------------------------------ decoding
    def _started(self, tickets: Sequence[Ticket], running: int) -> None:
        now = time.monotonic()
        for t in tickets:
            t.queue_wait = now - t.enqueued
            if self.metrics is not None:
                self.metrics.queue_wait.observe(t.queue_wait, expert=self.name)
        if self.metrics is not None:
            self.metrics.batch_size.observe(running, expert=self.name)

    def _join(self, loop: Any, live: dict[int, Ticket]) -> list[tuple[GenerationRequest, list[int]]]:
        """Between two steps: the waiting requests that fit in the running batch."""
        room = self.max_batch - len(loop.rows)
        if room <= 0 or not self._pending:
            return []
        joining: list[Ticket] = []
        with self._cv:
            while self._pending and len(joining) < room:
                t = self._pending.popleft()
                if not t.cancelled:
                    joining.append(t)
            self._gauge()
        if joining:
            self._started(joining, len(loop.rows) + len(joining))
            live.update((id(t.request), t) for t in joining)
        return [(t.request, t.prompt) for t in joining]

    def _decode(self, batch: list[Ticket], *, recover: bool = True) -> None:
        from collab.decode import RequestRule, decode

        self._started(batch, len(batch))
        live = {id(t.request): t for t in batch}  # every request the batch has held
        requests = [t.request for t in batch]
        eos = self.expert.eos_token_ids[0] if self.expert.eos_token_ids else None
        rule = _CancelRule(RequestRule(requests), live, eos)
        admit = (lambda loop: self._join(loop, live)) if self.continuous and recover else None
        try:
            for events in decode(self.expert, requests, rule, prompts=[t.prompt for t in batch], admit=admit):
                for e in events:
                    t = live[id(e.request)]
                    if t.cancelled:
                        continue
                    if e.text:
                        t.send("delta", e.text)
                    if e.completion is not None:
                        t.send("done", e.completion)
                if admit is None and all(t.finished or t.cancelled for t in batch):
                    break
        except Exception as e:  # noqa: BLE001 - one request's failure must not take the others with it
            left = [t for t in live.values() if not t.finished and not t.cancelled]
            log.exception("expert '%s': batch of %d failed", self.name, len(left))
            for t in left:
                if recover and len(left) > 1 and not t.started:
                    self._decode([t], recover=False)  # alone, it either answers or fails by itself
                else:
                    t.send("error", ExpertFailed(f"expert '{self.name}' failed: {type(e).__name__}: {e}"))

    def close(self) -> None:
        """Stop the worker after its current batch; requests still queued fail."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)


def _can_join(expert: "Expert") -> bool:
    """Whether rows can join a running batch of ``expert`` (no sliding-window cache layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=expert.model.config).layers)


class BatchedExpert(BaseSystem):
    """A local expert seen through its batcher: ``generate`` and ``stream`` queue the
    request and block until its batch answers; scoring goes to the expert itself."""

    def __init__(self, batcher: ExpertBatcher) -> None:
        self.batcher = batcher
        self.expert = batcher.expert
        self.name = batcher.expert.name

    @property
    def context_window(self) -> int:
        return self.expert.context_window

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        owner = getattr(_current, "handle", None)  # the client request this call serves, if any
        ticket = self.batcher.submit(request, events.put)
        try:
            while True:
                try:
                    kind, value = events.get(timeout=None if owner is None else 0.2)
                except queue.Empty:
                    kind, value = "", None
                if owner is not None and owner.cancelled:
                    raise Cancelled()
                if not kind:
                    continue
                if kind == "delta":
                    yield StreamChunk(text=value)
                elif kind == "done":
                    yield StreamChunk(text="", finish_reason=value.finish_reason, usage=value.usage, trace=value.trace)
                    return
                else:
                    raise value
        finally:
            ticket.cancel()  # a no-op once it finished; stops the row if the caller gave up

    def generate(self, request: GenerationRequest) -> Completion:
        return collect_stream(self.stream(request))

    def render(self, request: GenerationRequest) -> str:
        return self.expert.render(request)

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self.expert.loglikelihood(context, continuation)

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        return self.expert.loglikelihood_batch(pairs, batch_size)

    def loglikelihood_rolling(self, text: str) -> float:
        return self.expert.loglikelihood_rolling(text)
