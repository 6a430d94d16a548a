"""Prometheus metrics in the text exposition format (version 0.0.4), thread-safe.

Counters, gauges and histograms with labels, enough for ``GET /metrics``:
requests, errors by status, tokens, latency and queue-wait histograms,
batch sizes and routed-to counts per system.
"""

from __future__ import annotations

import bisect
import threading
from typing import Sequence

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}" if items else ""


def _num(x: float) -> str:
    x = float(x)
    if x == float("inf"):
        return "+Inf"
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Counter:
    def __init__(self, name: str, help: str, kind: str = "counter") -> None:
        self.name, self.help, self.kind = name, help, kind
        self.values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self.values[_labels(labels)] = float(value)

    def get(self, **labels: str) -> float:
        return self.values.get(_labels(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            for key, v in sorted(self.values.items()):
                lines.append(f"{self.name}{_fmt_labels(key)} {_num(v)}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = sorted(buckets)
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket (+Inf last), [sum]
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            counts, total = self.series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        s = self.series.get(_labels(labels))
        return sum(s[0]) if s else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for key, (counts, total) in sorted(self.series.items()):
                cum = 0
                for le, c in zip([*self.buckets, float("inf")], counts):
                    cum += c
                    lines.append(f"{self.name}_bucket{_fmt_labels(key, (('le', _num(le)),))} {cum}")
                lines.append(f"{self.name}_sum{_fmt_labels(key)} {_num(total[0])}")
                lines.append(f"{self.name}_count{_fmt_labels(key)} {cum}")
        return lines


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.requests = Counter("collab_requests_total", "Requests answered, by endpoint, model and HTTP status.")
        self.errors = Counter("collab_request_errors_total", "Requests that ended in an error, by HTTP status.")
        self.tokens = Counter("collab_tokens_total", "Tokens processed, by model and kind (prompt or completion).")
        self.latency = Histogram("collab_request_latency_seconds", "Time from a request's arrival to its last byte, by model.", _SECONDS)
        self.queue_wait = Histogram("collab_queue_wait_seconds", "Time a request waited in a local expert's queue before its batch started.", _SECONDS)
        self.batch_size = Histogram("collab_batch_size", "Requests decoded together in one batch, by local expert.", (1, 2, 4, 8, 16, 32, 64))
        self.routed = Counter("collab_routed_total", "Answers of a routed system, by system and the expert it routed to.")
        self.queue_depth = Counter("collab_queue_depth", "Requests waiting in a local expert's queue now.", kind="gauge")
        self.in_flight = Counter("collab_requests_in_flight", "Requests being answered now.", kind="gauge")

    def render(self) -> str:
        out: list[str] = []
        for m in (self.requests, self.errors, self.tokens, self.latency, self.queue_wait, self.batch_size, self.routed, self.queue_depth, self.in_flight):
            out.extend(m.render())
        return "\n".join(out) + "\n"
