"""What the benchmark scripts share: timestamped log lines and a training
progress callback that logs at most once a minute (and at the end)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def log(msg: str, *, err: bool = False) -> None:
    """``msg`` with the time of day, flushed at once (to stderr with ``err``)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr if err else sys.stdout, flush=True)


def training_progress(every_s: float = 60.0) -> Callable[[str, int, int, float | None], None]:
    """A trainer's ``progress(phase, done, total, loss)`` that logs a line at most
    every ``every_s`` seconds, and always the last step of a phase."""
    last = [0.0]

    def progress(phase: str, done: int, total: int, loss: float | None) -> None:
        if time.time() - last[0] > every_s or done == total:
            last[0] = time.time()
            log(f"  {phase} {done}/{total}" + (f" loss {loss:.4f}" if loss is not None else ""))

    return progress
