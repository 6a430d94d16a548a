"""What the benchmark scripts share: timestamped log lines, a training
progress callback that logs at most once a minute (and at the end), and the
paired bootstrap difference of two systems' per-question scores."""

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


def paired(a: dict[str, float], b: dict[str, float], n_boot: int = 2000) -> dict[str, float]:
    """Mean of a - b over the ids both score, with its 95% paired bootstrap interval."""
    from collab.stats import bootstrap_ci

    ids = sorted(set(a) & set(b))
    mean, lo, hi = bootstrap_ci([a[i] - b[i] for i in ids], n_boot)
    return {"diff": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "n": len(ids)}
