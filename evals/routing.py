"""Routing-data collection: run several systems on the same benchmark examples
and write the canonical routing table of DESIGN.md, the input routers train on.

One JSONL line per query that every system answered::

    {"id": "gsm8k/test-0000", "task": "gsm8k", "prompt": "<the user question>",
     "scores": {"smol": 1.0, "gemma": 0.0}, "costs": {"smol": 412.0, "gemma": 388.0}}

``prompt`` is the text a router sees: the example's question without the
benchmark's instructions or answer format. ``costs`` are tokens (prompt plus
completion tokens the system reported; for log-likelihood scoring, the tokens
scored) by default, or seconds of latency with ``cost="latency"``. With
``responses=True`` each row also holds ``gold`` (the benchmark's reference answer,
as text) and ``responses`` ({system: its output}): the table FusionFactory's
thought and model levels learn from (``routers.fusion``).
Each (benchmark, system) run is kept in ``runs_dir`` so collection resumes:
after Ctrl-C (``collab.errors.Interrupted``) or a crash, the same call or
command continues where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from collab.errors import CollabError, Interrupted
from collab.io import atomic_write_text
from evals.benchmarks import get_benchmark
from evals.runner import EvalInterrupted, EvalResult, evaluate

COSTS = ("tokens", "latency")


def routing_rows(results: Mapping[str, EvalResult], benchmark: str, cost: str = "tokens", responses: bool = False) -> list[dict[str, Any]]:
    """Rows for one benchmark from each system's result, in benchmark order;
    only the examples every system has a record for; with ``responses``, each
    row's gold answer and every system's output too."""
    if cost not in COSTS:
        raise CollabError(f"cost: expected one of {', '.join(COSTS)}, found {cost!r}")
    bench = get_benchmark(benchmark)
    by_system = {s: {r["id"]: r for r in res.records} for s, res in results.items()}
    rows = []
    for ex in bench.examples():
        recs = {s: m.get(ex.id) for s, m in by_system.items()}
        if any(r is None for r in recs.values()):
            continue
        row = {
            "id": f"{bench.name}/{ex.id}",
            "task": bench.name,
            "prompt": ex.question,
            "scores": {s: min(1.0, max(0.0, float(r["score"]))) for s, r in recs.items()},  # type: ignore[index]
            "costs": {s: float(r["tokens"]["total"]) if cost == "tokens" else float(r["latency"]) for s, r in recs.items()},  # type: ignore[index]
        }
        if responses:
            row["gold"] = ex.gold if isinstance(ex.gold, str) else json.dumps(ex.gold)
            row["responses"] = {s: str(r.get("output", "")) for s, r in recs.items()}  # type: ignore[union-attr]
        rows.append(row)
    return rows


def collect_routing_table(
    systems: Mapping[str, Any] | Callable[[str], Any],
    system_names: Sequence[str],
    benchmarks: Sequence[str],
    out: str | os.PathLike[str],
    limit: int | None = None,
    runs_dir: str | os.PathLike[str] | None = None,
    cost: str = "tokens",
    batch_size: int = 8,
    mode: str = "auto",
    progress: bool = True,
    resume_command: str | None = None,
    responses: bool = False,
) -> dict[str, Any]:
    """Evaluate every system on every benchmark and write the routing table to
    ``out`` (atomically). ``systems`` maps names to Systems, or is a function
    that builds one by name (e.g. ``spec.system``). Returns a summary: rows per
    task, mean score per system, where the runs are. Ctrl-C raises
    ``collab.errors.Interrupted`` naming what is saved and ``resume_command``
    (the command line that resumes; without one, this call again). ``responses``
    adds each row's gold answer and the systems' outputs (``routing_rows``)."""
    if len(system_names) < 2:
        raise CollabError(f"a routing table needs at least 2 systems, found {len(system_names)}: {', '.join(system_names)}")
    if cost not in COSTS:
        raise CollabError(f"cost: expected one of {', '.join(COSTS)}, found {cost!r}")
    for b in benchmarks:
        get_benchmark(b)  # unknown names fail before any model loads
    get = systems if callable(systems) else systems.__getitem__
    out = Path(out)
    runs = Path(runs_dir) if runs_dir is not None else out.with_name(out.name + ".runs")
    all_rows: list[dict[str, Any]] = []
    per_task: dict[str, int] = {}
    means: dict[str, dict[str, float]] = {}
    for b in benchmarks:
        bench = get_benchmark(b)
        results = {}
        for s in system_names:
            run_dir = runs / _safe(bench.name) / _safe(s)
            try:
                res = evaluate(get(s), bench, limit=limit, out_dir=run_dir, batch_size=batch_size, mode=mode, progress=progress)
            except EvalInterrupted as e:
                how = resume_command or "collect_routing_table(...) again with the same runs_dir"
                raise Interrupted(
                    f"collecting the routing table {out} stopped by Ctrl-C: '{s}' on '{bench.name}' after "
                    f"{e.done} of {e.total} examples, saved in {run_dir} beside the finished runs in {runs}; "
                    f"the table is written once every run is complete; resume with: {how}"
                ) from None
            results[s] = res
            means.setdefault(bench.name, {})[s] = res.score
        rows = routing_rows(results, bench.name, cost, responses)
        per_task[bench.name] = len(rows)
        all_rows.extend(rows)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows))
    return {"out": str(out), "rows": len(all_rows), "tasks": per_task, "scores": means, "runs_dir": str(runs), "cost": cost}


def _safe(name: str) -> str:
    return name.replace(":", "-").replace(os.sep, "_")
