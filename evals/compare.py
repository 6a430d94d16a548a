"""Compare evaluation runs: a per-benchmark table (systems as columns) and a
bar chart with the bootstrap 95% intervals as error bars."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from collab.errors import CollabError
from evals.runner import SUMMARY


def load_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The summary.json of a run directory, with its path; CollabError naming what is missing."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise CollabError(f"{run_dir}: not an evaluation run (no {SUMMARY}); expected a directory written by 'collab eval --out'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CollabError(f"{path}: not valid JSON ({e})") from e
    for key in ("benchmark", "system", "score", "ci_low", "ci_high", "n"):
        if key not in data:
            raise CollabError(f"{path}: field '{key}' is missing")
    data["run_dir"] = str(run_dir)
    return data


def compare_runs(run_dirs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Gather runs into ``{"benchmarks": [...], "systems": [...], "cells": {bench: {system: summary}}}``.
    Two runs of the same (benchmark, system) is an error: which one to show is ambiguous."""
    if not run_dirs:
        raise CollabError("--compare needs at least one run directory")
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    benches: list[str] = []
    systems: list[str] = []
    for d in run_dirs:
        s = load_summary(d)
        b, sys_ = s["benchmark"], s["system"]
        if sys_ in cells.get(b, {}):
            raise CollabError(f"{d}: a second run of benchmark '{b}' by system '{sys_}' (first: {cells[b][sys_]['run_dir']})")
        cells.setdefault(b, {})[sys_] = s
        if b not in benches:
            benches.append(b)
        if sys_ not in systems:
            systems.append(sys_)
    return {"benchmarks": benches, "systems": systems, "cells": cells}


def format_cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    mark = "" if s.get("complete", True) else "*"
    cost = f" cost x{s['cost']['ratio']:.1f}" if s.get("cost") else ""
    return f"{s['score']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] n={s['n']}{cost}{mark}"


def print_table(comparison: dict[str, Any], title: str = "collab eval") -> None:
    """Print benchmarks as rows and systems as columns (score [95% CI] n)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("benchmark")
    for s in comparison["systems"]:
        table.add_column(s)
    for b in comparison["benchmarks"]:
        table.add_row(b, *[format_cell(comparison["cells"][b].get(s)) for s in comparison["systems"]])
    Console().print(table)
    if any(not c.get("complete", True) for row in comparison["cells"].values() for c in row.values()):
        Console().print("* incomplete run (interrupted); rerun the same command to resume")


def plot_comparison(comparison: dict[str, Any], png: str | os.PathLike[str]) -> Path:
    """Grouped bars (one group per benchmark, one bar per system) with 95% intervals; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    benches, systems = comparison["benchmarks"], comparison["systems"]
    x = np.arange(len(benches))
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(benches) * max(1, len(systems)) ** 0.5 + 2), 4.0))
    for i, s in enumerate(systems):
        vals, lo, hi = [], [], []
        for b in benches:
            c = comparison["cells"][b].get(s)
            v = float(c["score"]) if c else np.nan
            vals.append(v)
            lo.append(v - float(c["ci_low"]) if c else 0.0)
            hi.append(float(c["ci_high"]) - v if c else 0.0)
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(benches, rotation=20, ha="right")
    ax.set_ylabel("score (95% bootstrap interval)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)
    return png
