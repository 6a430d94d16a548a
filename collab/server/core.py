"""The server's state, apart from HTTP: which models it serves, whether they are
loaded, and how a request reaches a system.

A local expert is served through its ``ExpertBatcher``. Any other system (a
router, a remote expert, a co-decoder) runs in a worker thread; where it is
built over local experts (a public ``experts`` mapping, or a remote expert's
``fallback``), it is served as a copy whose experts are ``BatchedExpert`` views,
so its requests join the same batches as requests sent to the experts directly.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from collab.server.batching import BatchedExpert, Cancelled, Event, ExpertBatcher, running
from collab.server.errors import APIError, QueueFull
from collab.server.metrics import Metrics
from collab.server.schema import Limits
from collab.system import Completion, GenerationRequest, Usage

log = logging.getLogger("collab.server")


@dataclass
class ServeOptions:
    """How the server batches, queues and guards requests.

    ``max_batch`` requests to one local expert decode together; the worker waits
    up to ``max_wait_ms`` after the oldest waiting request arrived for others;
    with ``continuous``, waiting requests also join a running batch between two
    steps (for experts whose KV cache allows it);
    at most ``max_queue`` requests wait per local expert (and as many run at once
    on the other systems) before new ones get 429. ``api_key`` (if set) must come
    as ``Authorization: Bearer KEY`` on every ``/v1`` request. Bodies over
    ``max_body_bytes`` get 413."""

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    continuous: bool = True
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        from collab.errors import CollabError

        for key, low in (("max_batch", 1), ("max_queue", 1), ("max_body_bytes", 1)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                raise CollabError(f"serve: --{key.replace('_', '-')}: expected an integer >= {low}, found {getattr(self, key)!r}")
        if not self.max_wait_ms >= 0:
            raise CollabError(f"serve: --max-wait-ms: expected a number >= 0, found {self.max_wait_ms!r}")


@runtime_checkable
class _Composite(Protocol):
    """A system built over sub-systems that it keeps in a public ``experts`` mapping (a router)."""

    experts: Mapping[str, Any]


@dataclass
class Model:
    """One served model: the system as the spec built it, the view requests go
    through, and the batcher when the system is itself a local expert."""

    name: str
    system: Any
    view: Any
    kind: str
    batcher: ExpertBatcher | None = None

    @property
    def context_window(self) -> int | None:
        return getattr(self.view, "context_window", None) if self.batcher is not None else None


class Handle:
    """A running generation; ``cancel`` stops it (at its next step or chunk)."""

    def __init__(self) -> None:
        self.cancelled = False
        self.queue_wait: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class CollabServer:
    """The models of one spec (or a mapping of ready systems), loaded in the
    background, each answering through its batcher or a worker thread."""

    def __init__(
        self,
        names: list[str],
        build: Callable[[str], Any],
        options: ServeOptions | None = None,
        *,
        kinds: Mapping[str, str] | None = None,
        source: str = "",
    ) -> None:
        self.names = list(names)
        self.kinds = dict(kinds or {})
        self.options = options or ServeOptions()
        self.source = source
        self.metrics = Metrics()
        self.status = "loading"
        self.error: BaseException | None = None
        self.models: dict[str, Model] = {}
        self._build = build
        self._batchers: dict[int, ExpertBatcher] = {}
        self._views: dict[int, Any] = {}
        self._threads = ThreadPoolExecutor(max_workers=self.options.max_queue + 4, thread_name_prefix="collab-serve")
        self._running = 0
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Any, options: ServeOptions | None = None) -> "CollabServer":
        kinds = {n: "remote" if e.remote else "expert" for n, e in spec.experts.items()}
        kinds.update({n: str(cfg["type"]) for n, cfg in spec.systems.items()})
        return cls(spec.names(), spec.system, options, kinds=kinds, source=str(spec.path or ""))

    @classmethod
    def from_systems(cls, systems: Mapping[str, Any], options: ServeOptions | None = None) -> "CollabServer":
        return cls(list(systems), systems.__getitem__, options)

    # ---------------------------------------------------------------- loading
    def load(self) -> None:
        """Build every system (loading the experts); the server is ready after this."""
        try:
            for name in self.names:
                t0 = time.monotonic()
                system = self._build(name)
                view = self._view(system)
                batcher = view.batcher if isinstance(view, BatchedExpert) else None
                kind = self.kinds.get(name) or _kind(system)
                self.models[name] = Model(name, system, view, kind, batcher)
                log.info("loaded %s (%s) in %.1f s", name, kind, time.monotonic() - t0)
        except BaseException as e:
            self.error = e
            self.status = "failed"
            raise
        self.status = "ready"

    def _view(self, system: Any) -> Any:
        """``system`` as requests reach it: local experts through their batchers."""
        from collab.experts import Expert
        from collab.remote import FallbackSystem

        key = id(system)
        if key in self._views:
            return self._views[key]
        if isinstance(system, Expert):
            batcher = ExpertBatcher(
                system,
                max_batch=self.options.max_batch,
                max_wait_ms=self.options.max_wait_ms,
                max_queue=self.options.max_queue,
                metrics=self.metrics,
                continuous=self.options.continuous,
            )
            self._batchers[key] = batcher
            view: Any = BatchedExpert(batcher)
        elif isinstance(system, FallbackSystem):
            view = copy.copy(system)
            view.fallback = self._view(system.fallback)
        elif isinstance(system, _Composite) and isinstance(system.experts, Mapping):
            view = copy.copy(system)
            view.experts = {k: self._view(v) for k, v in system.experts.items()}
        else:
            view = system
        self._views[key] = view
        return view

    def model(self, name: str) -> Model:
        """The served model ``name``; APIError 503 while loading, 404 if unknown."""
        if name not in self.names:
            raise APIError(404, f"model '{name}' not found; this server has: {', '.join(self.names)}", param="model", code="model_not_found")
        if self.status != "ready":
            what = f"failed to load: {self.error}" if self.status == "failed" else "still loading its experts; retry shortly"
            raise APIError(503, f"the server is {what}", code="loading" if self.status == "loading" else "load_failed")
        return self.models[name]

    # ------------------------------------------------------------- generation
    def start(self, model: Model, request: GenerationRequest, deliver: Callable[[Event], None], *, deltas: bool) -> Any:
        """Start one generation; its events go to ``deliver`` from another thread.
        Returns something with ``cancel()`` and ``queue_wait``. Raises
        ContextLengthError, RequestError or QueueFull before anything runs."""
        if model.batcher is not None:
            return model.batcher.submit(request, deliver, deltas=deltas)
        with self._lock:
            if self._running >= self.options.max_queue:
                raise QueueFull(f"model '{model.name}': {self._running} requests already running (--max-queue {self.options.max_queue}); retry later")
            self._running += 1
        handle = Handle()
        self._threads.submit(self._run, model, request, deliver, deltas, handle)
        return handle

    def _run(self, model: Model, request: GenerationRequest, deliver: Callable[[Event], None], deltas: bool, handle: Handle) -> None:
        try:
            with running(handle):
                self._answer(model, request, deliver, deltas, handle)
        except Cancelled:
            pass  # the client went away; nobody is listening
        except Exception as e:  # noqa: BLE001 - reported to the request, never to the server
            try:
                deliver(("error", e))
            except Exception:  # noqa: BLE001 - the receiver is gone
                pass
        finally:
            with self._lock:
                self._running -= 1

    def _answer(self, model: Model, request: GenerationRequest, deliver: Callable[[Event], None], deltas: bool, handle: Handle) -> None:
        if not deltas:
            deliver(("done", model.view.generate(request)))
            return
        chunks = model.view.stream(request)
        parts: list[str] = []
        try:
            for ch in chunks:
                if handle.cancelled:
                    return
                if ch.text:
                    parts.append(ch.text)
                    deliver(("delta", ch.text))
                if ch.finish_reason is not None:
                    deliver(("done", Completion("".join(parts), ch.finish_reason, ch.usage or Usage(), ch.trace or {})))
                    return
            deliver(("done", Completion("".join(parts))))
        finally:
            close = getattr(chunks, "close", None)  # a generator: stop it, and what it holds
            if close is not None:
                close()

    def close(self) -> None:
        for b in self._batchers.values():
            b.close()
        self._threads.shutdown(wait=False, cancel_futures=True)


def _kind(system: Any) -> str:
    """What a model is, for /v1/models: expert, remote, or the spec's system type."""
    from collab.experts import Expert
    from collab.remote import FallbackSystem, RemoteExpert

    if isinstance(system, Expert):
        return "expert"
    if isinstance(system, (RemoteExpert, FallbackSystem)):
        return "remote"
    return type(system).__name__
