"""The population router's meta-training material: episodes drawn from a routing table,
synthetic experts that stretch a small population, and pseudo-labels that stretch a small
context set (routers/population.py describes the method)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class EpisodeSettings(Protocol):
    """The fields of ``routers.population.PopulationRouterConfig`` that episodes read
    (a protocol, so this module need not import the router's)."""

    empty_share: float
    context_min: int
    context_max: int
    synthetic_share: float
    synthetic_clusters: int
    seed: int

# ------------------------------------------------------------------ episodes
def distinct_prompt_rows(prompts: Sequence[str]) -> np.ndarray:
    """The first row of each distinct prompt: episodes draw from these, so a context and
    its targets can never hold the same prompt twice (tables may repeat a prompt)."""
    seen: set[str] = set()
    out = []
    for i, p in enumerate(prompts):
        if p not in seen:
            seen.add(p)
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def context_size(
    rng: np.random.Generator, config: EpisodeSettings, available: int
) -> int:
    """A meta-training context size: 0 with probability ``empty_share``, else uniform on
    [context_min, context_max], leaving at least one of ``available`` rows for targets."""
    if rng.random() < config.empty_share:
        return 0
    lo, hi = (
        min(config.context_min, config.context_max),
        max(config.context_min, config.context_max),
    )
    return int(min(rng.integers(lo, hi + 1), max(available - 1, 0)))


def sample_episode(
    rng: np.random.Generator,
    pool: np.ndarray,
    size: int,
    targets: int,
    target_pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(context rows, target rows): ``size`` rows of ``pool`` and up to ``targets`` rows of
    ``target_pool`` (default: the rest of ``pool``), never a row of the context."""
    ctx = (
        rng.choice(pool, size=min(size, len(pool)), replace=False)
        if size
        else np.zeros(0, dtype=np.int64)
    )
    rest = np.setdiff1d(
        pool if target_pool is None else target_pool, ctx, assume_unique=True
    )
    tgt = (
        rng.choice(rest, size=min(targets, len(rest)), replace=False)
        if len(rest)
        else np.zeros(0, dtype=np.int64)
    )
    return ctx.astype(np.int64), tgt.astype(np.int64)


def _pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(B, max len) row indices (0 where padded) and the (B, max len) mask of real entries."""
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for b, r in enumerate(rows):
        idx[b, : len(r)] = r
        mask[b, : len(r)] = True
    return idx, mask


@dataclasses.dataclass
class Episode:
    """One meta-training episode: context rows and target rows of the table, with the
    scores of the episode's expert on them."""

    context: np.ndarray
    targets: np.ndarray
    context_y: np.ndarray
    targets_y: np.ndarray


def synthetic_scores(
    rng: np.random.Generator,
    y: np.ndarray,
    clusters: np.ndarray,
    expert: int,
    kind: str,
) -> Any:
    """A function rows -> scores of an expert made for one episode. ``real``: expert
    ``expert`` of the table. ``mix``: it on a random half of the query clusters and another
    expert of the table on the rest. ``skill``: it, except on a random half of the clusters,
    where it is right with a rate drawn uniformly per cluster, so that meta-training also
    sees experts right where the whole table fails (a new expert's specialty)."""
    k = int(clusters.max()) + 1 if len(clusters) else 1
    if kind == "real" or y.shape[1] < 2 and kind == "mix":
        return lambda rows: y[rows, expert]
    region = rng.random(k) < 0.5
    if kind == "mix":
        other = int((expert + rng.integers(1, y.shape[1])) % y.shape[1])
        return lambda rows: np.where(
            region[clusters[rows]], y[rows, expert], y[rows, other]
        )
    rates = rng.random(k)
    return lambda rows: np.where(
        region[clusters[rows]],
        (rng.random(len(rows)) < rates[clusters[rows]]).astype(y.dtype),
        y[rows, expert],
    )


def episode_batch(x: Any, episodes: list[Episode]) -> tuple[Any, ...]:
    """Tensors of a batch of episodes: targets' x (B, T, d), context x (B, C, d) and scores
    (B, C), context mask (B, C), targets' scores (B, T) and mask (B, T)."""
    import torch

    ci, cm = _pad([e.context for e in episodes])
    ti, tm = _pad([e.targets for e in episodes])
    cy, ty = np.zeros(ci.shape, dtype=np.float32), np.zeros(ti.shape, dtype=np.float32)
    for i, e in enumerate(episodes):
        cy[i, : len(e.context)], ty[i, : len(e.targets)] = e.context_y, e.targets_y
    return (
        x[torch.from_numpy(ti)],
        x[torch.from_numpy(ci)],
        torch.from_numpy(cy),
        torch.from_numpy(cm),
        torch.from_numpy(ty),
        torch.from_numpy(tm),
    )


def prompt_clusters(x: np.ndarray, c: EpisodeSettings) -> np.ndarray:
    """(n,) k-means cluster of each training query: the regions of synthetic experts."""
    k = max(1, min(c.synthetic_clusters, len(x)))
    if c.synthetic_share <= 0 or k == 1:
        return np.zeros(len(x), dtype=np.int64)
    from sklearn.cluster import KMeans

    return (
        KMeans(n_clusters=k, n_init=2, random_state=c.seed)
        .fit(x)
        .labels_.astype(np.int64)
    )


# ------------------------------------------------------------ pseudo-labels
def pseudo_label(
    x_demo: np.ndarray,
    y_demo: np.ndarray,
    pool_x: np.ndarray,
    count: int,
    k: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``pool_x``, 0/1 labels): the ``count`` unlabelled queries whose label a
    semi-supervised correctness model is surest of. The model is label spreading (Zhou et al.
    2004) on the k-nearest-neighbour graph of the demonstrations and the pool; the picks keep
    the demonstrations' share of right answers. With one class among the demonstrations
    (nothing to tell apart) it labels nothing."""
    from sklearn.semi_supervised import LabelSpreading

    labels = (np.asarray(y_demo) >= 0.5).astype(np.int64)
    count = min(int(count), len(pool_x))
    if count <= 0 or len(np.unique(labels)) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    feats = np.concatenate([x_demo, pool_x]).astype(np.float64)
    y = np.concatenate([labels, -np.ones(len(pool_x), dtype=np.int64)])
    model = LabelSpreading(
        kernel="knn", n_neighbors=min(k, len(feats) - 1), max_iter=100
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(feats, y)
    p = model.label_distributions_[
        len(x_demo) :, list(model.classes_).index(1)
    ]  # (pool,) P(right)
    p = np.nan_to_num(p, nan=float(labels.mean()))
    n_pos = int(np.rint(count * labels.mean()))
    pos = np.argsort(-p, kind="stable")[:n_pos]
    taken = set(pos.tolist())
    neg = np.asarray(
        [i for i in np.argsort(p, kind="stable") if i not in taken][: count - n_pos],
        dtype=np.int64,
    )
    return np.concatenate([pos, neg]).astype(np.int64), np.concatenate(
        [np.ones(len(pos)), np.zeros(len(neg))]
    ).astype(np.float32)
