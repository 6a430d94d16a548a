"""Label-free prior adaptation of a trained router to new traffic (``collab route adapt``).

When the mix of queries moves (more of a task some expert is bad at), how often each
expert is right moves with it, and a router's predictions, calibrated to its training
table, carry the old rates. Saerens, Latinne and Decaestecker (2002, "Adjusting the
outputs of a classifier to new a priori probabilities: a simple procedure") re-estimate
the new class priors from unlabelled data by EM: rescale each posterior by new prior /
old prior, renormalise, take the mean posterior as the new prior, repeat. It assumes the
shift is in the priors (p(x | class) unchanged) and calibrated posteriors.

Here the "classes" are per expert: a score router predicts, for each expert j,
p_j(x) = P(j answers x right), a binary posterior with training prior pi_j (the expert's
mean training score). The EM runs per expert on the two classes {right, wrong}:

    q_j(x) = (pi'_j / pi_j) p_j(x) / [(pi'_j / pi_j) p_j(x) + ((1 - pi'_j) / (1 - pi_j)) (1 - p_j(x))]
    pi'_j  <- mean over the new prompts of q_j(x)

and the adapted router predicts q_j(x). The adjustment is monotone per expert but differs
between experts, so it changes which expert ranks first where the estimated rates moved.
For the ``classifier`` router, whose outputs are one distribution over "which expert is
best", it is the original multi-class EM on those classes. Estimated priors that move by
less than ``min_change`` (EM on a few hundred prompts is noisy) leave the router as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from collab.io import jsonl_rows
from routers.base import (
    AT_LEAST_1,
    NON_NEGATIVE,
    Bound,
    Router,
    RouterConfig,
    RouterError,
    WrapperRouter,
    register_router,
)

_EPS = 1e-4


def em_priors(pred: np.ndarray, train_priors: np.ndarray, mode: str = "binary", max_iter: int = 200, tol: float = 1e-7, strength: float = 0.0) -> tuple[np.ndarray, np.ndarray, int]:
    """Saerens et al.'s EM: (new priors (E,), adjusted predictions (n, E), iterations).

    ``mode='binary'``: each column of ``pred`` is a separate P(right) with prior
    ``train_priors[j]``; ``'multiclass'``: rows of ``pred`` are distributions over classes.
    ``strength`` > 0 makes it a MAP estimate: the training priors count as that many
    pseudo-observations (e.g. the number of training queries they were measured on)."""
    p = np.clip(np.asarray(pred, dtype=np.float64), _EPS, 1 - _EPS)  # (n, E)
    pi = np.clip(np.asarray(train_priors, dtype=np.float64), _EPS, 1 - _EPS)  # (E,)
    if p.ndim != 2 or p.shape[1] != len(pi):
        raise RouterError(f"prior adaptation: predictions of shape {p.shape} do not match {len(pi)} training priors")
    if mode == "multiclass":
        pi = pi / pi.sum()
        p = p / p.sum(axis=1, keepdims=True)
    elif mode != "binary":
        raise RouterError(f"prior adaptation: mode: expected 'binary' or 'multiclass', found {mode!r}")
    new = pi.copy()
    q = p
    it = 0
    for it in range(1, max_iter + 1):
        q = adjust(p, pi, new, mode)
        nxt = np.clip((q.sum(axis=0) + strength * pi) / (len(q) + strength), _EPS, 1 - _EPS)
        done = float(np.abs(nxt - new).max()) < tol
        new = nxt
        if done:
            break
    return new, adjust(p, pi, new, mode), it


def adjust(pred: np.ndarray, train_priors: np.ndarray, priors: np.ndarray, mode: str = "binary") -> np.ndarray:
    """Posteriors ``pred`` made under ``train_priors`` re-expressed under ``priors``."""
    p = np.clip(np.asarray(pred, dtype=np.float64), _EPS, 1 - _EPS)
    pi = np.clip(np.asarray(train_priors, dtype=np.float64), _EPS, 1 - _EPS)
    new = np.clip(np.asarray(priors, dtype=np.float64), _EPS, 1 - _EPS)
    if mode == "multiclass":
        w = p * (new / pi)
        return w / w.sum(axis=1, keepdims=True)
    a = new / pi * p
    b = (1 - new) / (1 - pi) * (1 - p)
    return a / (a + b)


@dataclasses.dataclass
class AdaptedRouterConfig(RouterConfig):
    """A trained router whose predictions are re-expressed under priors estimated on new traffic."""

    bounds: ClassVar[dict[str, Bound]] = {"min_change": NON_NEGATIVE, "max_iter": AT_LEAST_1, "strength": NON_NEGATIVE}
    encoder: str = "none"
    mode: str = "binary"
    """'binary' (per-expert P(right), score routers) or 'multiclass' (the classifier's P(best))."""
    min_change: float = 0.02
    """Apply the new priors only if some expert's moved by at least this much."""
    max_iter: int = 200
    strength: float = 0.0
    """Pseudo-observations of the training priors in the EM (a MAP estimate); 0: plain EM."""


@register_router("adapted")
class AdaptedRouter(WrapperRouter):
    """Any router (saved in ``base/``) with its predictions adjusted to priors re-estimated,
    without labels, on prompts of the new traffic (Saerens et al. 2002). ``meta.adapted``
    records the training and new priors per expert, the prompts used and whether they applied."""

    config_cls = AdaptedRouterConfig
    uses_encoder = False
    reference_url = "https://doi.org/10.1162/089976602753284446"
    wrapper_noun = "adapted router"

    def __init__(self, config: Any = None, base: Router | None = None) -> None:
        super().__init__(config, base)
        self.train_priors = np.zeros(0)
        self.priors = np.zeros(0)
        self.applied = False

    def _fit(self, x: np.ndarray | None, table: Any) -> None:
        raise RouterError("router 'adapted': made by `collab route adapt` (routers.adapt.adapt_router) from a trained router, not trained from a table")

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert self.base is not None
        return self._adjusted(self.base.predict(prompts))

    def _adjusted(self, pred: np.ndarray) -> np.ndarray:
        return adjust(pred, self.train_priors, self.priors, self.config.mode) if self.applied else pred

    def explain(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        assert self.base is not None
        pred, notes = self.base.explain(list(prompts))
        return np.clip(self._adjusted(pred), 0.0, 1.0), notes

    def _state(self) -> dict[str, np.ndarray]:
        return {"train_priors": self.train_priors.astype(np.float64), "priors": self.priors.astype(np.float64), "applied": np.array([int(self.applied)], dtype=np.int64)}

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.train_priors, self.priors = t["train_priors"], t["priors"]
        self.applied = bool(int(t["applied"][0]))


def training_priors(router: Router, where: str = "router") -> tuple[np.ndarray, str]:
    """(priors, mode) the router's predictions were made under: the classifier's label
    frequencies, or a score router's mean training scores (``meta.train_mean_scores``,
    recorded by ``collab route train``)."""
    if router.key == "adapted":
        raise RouterError(f"{where}: is already an adapted router; adapt its base router (in {where}/base) instead")
    if router.key == "classifier":
        pri = router.meta.get("label_priors")
        field, mode = "meta.label_priors", "multiclass"
    else:
        pri = router.meta.get("train_mean_scores")
        field, mode = "meta.train_mean_scores", "binary"
    if not isinstance(pri, list) or len(pri) != len(router.experts):
        raise RouterError(f"{where}/config.json: {field}: expected {len(router.experts)} numbers (one per expert, recorded by `collab route train`), found {pri!r}")
    return np.asarray(pri, dtype=np.float64), mode


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a JSONL file: one object per line with a non-empty string ``prompt``
    (a routing table's rows qualify; their scores are ignored)."""
    p = Path(path)
    if not p.is_file():
        raise RouterError(f"{p}: prompts file not found")
    out = []
    for n, obj in jsonl_rows(p, RouterError, lambda n: f"{p}: line {n}"):
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise RouterError(f"{p}: line {n}: field 'prompt': expected a non-empty string, found {found if not isinstance(obj, dict) or 'prompt' not in obj else repr(prompt)}")
        out.append(prompt)
    if not out:
        raise RouterError(f"{p}: no prompts (expected JSONL lines like {{\"prompt\": \"...\"}})")
    return out


def adapt(router: Router, prompts: Sequence[str], min_change: float = 0.02, max_iter: int = 200, where: str = "router", strength: float = 0.0) -> AdaptedRouter:
    """An AdaptedRouter around ``router`` with priors re-estimated on ``prompts`` (no labels);
    ``strength``: pseudo-observations of the training priors (0: plain EM, see ``em_priors``)."""
    pri, mode = training_priors(router, where)
    new, _, iters = em_priors(router.predict(list(prompts)), pri, mode, max_iter=max_iter, strength=strength)
    ar = AdaptedRouter(AdaptedRouterConfig(mode=mode, min_change=min_change, max_iter=max_iter, strength=strength), base=router)
    ar.experts = list(router.experts)
    ar.train_hash, ar.train_prompts = router.train_hash, router.train_prompts
    ar.train_priors, ar.priors = pri, new
    change = new - pri
    ar.applied = bool(np.abs(change).max() >= min_change)
    ar.meta = {k: v for k, v in router.meta.items() if k in ("train_queries", "train_sources", "train_mean_scores", "train_mean_costs", "heldout")}
    ar.meta["adapted"] = {
        "method": ("MAP-" if strength > 0 else "") + "EM re-estimation of priors (Saerens et al. 2002), " + ("per expert P(right)" if mode == "binary" else "over P(best expert)"),
        "base": router.key,
        "prompts": len(prompts),
        "iterations": iters,
        "applied": ar.applied,
        "min_change": min_change,
        "strength": strength,
        "priors": {e: {"train": float(a), "new": float(b), "change": float(b - a)} for e, a, b in zip(router.experts, pri, new)},
        "reason": (f"largest prior change {float(np.abs(change).max()):.3f} ({router.experts[int(np.abs(change).argmax())]}) "
                   + (f">= {min_change}: predictions adjusted" if ar.applied else f"< {min_change}: predictions left as they were")),
    }
    return ar


def adapt_router(router_dir: str | os.PathLike[str], prompts_file: str | os.PathLike[str], out: str | os.PathLike[str], min_change: float = 0.02, overwrite: bool = False, device: str = "cpu", strength: float | None = None) -> AdaptedRouter:
    """``collab route adapt``: load the router in ``router_dir``, adapt it to the prompts of
    ``prompts_file`` and save it to ``out`` (with the base's held-out ids, so ``route eval``
    scores the same rows). ``strength`` (pseudo-observations of the training rates in the
    EM's MAP estimate) defaults to the router's number of training queries, the sample its
    training rates were measured on (or the number of new prompts if it records none);
    0 is Saerens et al.'s plain EM."""
    from collab.io import atomic_directory
    from routers.api import HELDOUT_FILE, check_output_dir

    out_p = check_output_dir(out, overwrite)
    if min_change < 0:
        raise RouterError(f"--min-change: expected a number >= 0, found {min_change}")
    if strength is not None and strength < 0:
        raise RouterError(f"--strength: expected a number >= 0, found {strength}")
    base = Router.load(router_dir).to(device)
    prompts = read_prompts(prompts_file)
    if strength is None:
        n = base.meta.get("train_queries")
        strength = float(n) if isinstance(n, (int, float)) and n > 0 else float(len(prompts))
    ar = adapt(base, prompts, min_change=min_change, where=str(router_dir), strength=strength)
    ar.meta["adapted"]["prompts_file"] = Path(prompts_file).name
    with atomic_directory(out_p, overwrite=overwrite) as tmp:
        ar.save_into(tmp)
        held = Path(router_dir) / HELDOUT_FILE
        if held.is_file():
            shutil.copyfile(held, tmp / HELDOUT_FILE)
    return ar
