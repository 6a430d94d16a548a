"""collab's evals package: score any System on the same benchmarks, with the
same prompts, and collect routing data.

    from evals import evaluate
    result = evaluate(system, "arc_easy", limit=100, out_dir="runs/arc")

Importing ``evals`` is cheap; the runner and benchmarks load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "evaluate",
    "EvalResult",
    "register_benchmark",
    "get_benchmark",
    "benchmark_names",
    "collect_routing_table",
    "compare_runs",
]

_LAZY = {
    "evaluate": "evals.runner",
    "EvalResult": "evals.runner",
    "register_benchmark": "evals.benchmarks",
    "get_benchmark": "evals.benchmarks",
    "benchmark_names": "evals.benchmarks",
    "collect_routing_table": "evals.routing",
    "compare_runs": "evals.compare",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evals' has no attribute {name!r}")
