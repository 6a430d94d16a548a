"""Statistics shared by the evaluation runner, the routers and the benchmarks."""

from __future__ import annotations

from typing import Sequence


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean of ``values``
    at ``level``, from ``n_boot`` resamples drawn with ``seed``. NaNs when empty."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if np.all(v == v[0]):  # every resample has the same mean
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
