"""Rich progress bars for the CLI's long jobs. A trainer reports
``progress(phase, done, total, loss or None)``; ``phase_bars`` draws one bar per
phase. rich is imported only when bars are drawn, so ``collab --help`` stays fast.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional

#: progress(phase, done, total, loss or None)
PhaseProgress = Callable[[str, int, int, Optional[float]], None]


@contextlib.contextmanager
def phase_bars(quiet: bool, labels: Mapping[str, str]) -> Iterator[Optional[PhaseProgress]]:
    """A progress callback drawing one rich bar per phase, labelled by ``labels``
    (the phase's own name otherwise), with the latest loss; None when ``quiet``
    (and the libraries' own progress bars are silenced too)."""
    if quiet:
        from collab.io import silence_library_progress

        silence_library_progress()
        yield None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int, loss: Optional[float]) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(labels.get(phase, phase), total=total, loss="")
            bar.update(tasks[phase], completed=done, loss="" if loss is None else f"loss {loss:.4f}")

        yield report
