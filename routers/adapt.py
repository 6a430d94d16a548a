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

The per-expert EM reads any change of the prompt mix as changed rates, and the experts'
rates are correlated (a hard prompt is hard for all), so on LLMRouter it over-corrects.
``method='tilt'`` (needs the training table) models label shift on the *joint*
correctness vector y in {0,1}^E instead: the new traffic is the training traffic
reweighted by exp(theta . y), p(x | y) unchanged. theta is fitted by matching the mean
out-of-fold predictions of the router on its training table, reweighted, to the mean
predictions on the new prompts (a ridge-penalised method of moments, like black-box shift
estimation, Lipton et al. 2018, with correlated labels), penalising differences between the
experts' tilts (a uniform tilt, traffic harder or easier for all, changes no choice), and the
router's predictions become sigmoid(logit p_j(x) + theta_j). That adjustment treats the
experts' successes as independent given the prompt; on LLMRouter it lost on two of four
simulated expert-specific label shifts even with the true theta (docs/benchmarks.md), which is
why the third test below scores it on real correctness first. Three tests guard it, the first
two on the same moments:

- label shift at all? The new prompts' shape, i.e. their proportions in ``clusters`` k-means
  cells of the training prompts and their mean along its leading principal components, gives
  extra moments the reweighting must reproduce (Hansen's over-identification test): a change
  of task mix moves prompts in a way no reweighting of y explains, and is rejected (the
  router's per-prompt predictions already follow a covariate shift, so it is left as it was);
- any shift? The fit must beat theta = 0 by more than the chi-square quantile for E
  parameters;
- does the adjustment route better? The training rows, weighted by exp(theta . y) (the
  training traffic as the estimated shift would make it), must be routed better by the
  adjusted out-of-fold predictions than by the unadjusted ones, by ``min_gain`` standard
  errors of that weighted difference. This scores the adjustment on real correctness, so it
  catches what the moments cannot: an adjustment that treats correlated experts as
  independent, or a theta fitted to a change of mix the first test let through.

Only when the first test passes, the second rejects "no shift" and the third finds a gain
is theta applied.

The defaults (16 cells, 16 components, ``spread`` 20, the moment tests at level 0.1) were
chosen on simulated shifts of LLMRouter's seed-1 and seed-2 splits (bench/routers.py
``--adapt``): a stricter test adapts to fewer label shifts, a looser one let a larger share of
open-QA traffic through as label shift, which it is not, and lost 12 points of the gap there.
``min_gain`` 1 was chosen among 0, 1 and 2 on seeds 1-3 drawn exactly (``--adapt-sampling
exact``) and checked once on seed 4.

Before the free tilt, a narrower model is tried (``tilt_estimate_one``): one expert's rate
moved against the others, theta = c0 (1, ..., 1) + c1 e_k. Unlabelled prompts pin a common
change and one expert's own change well, the nine rates freely badly (the Cramer-Rao floor in
docs/benchmarks.md), so this is the shift they can act on: the expert whose model fits best
must beat the common change alone (at level alpha / E) and the runner-up expert (at alpha),
pass the shape test, and route the reweighted training rows better. It then re-expresses each
prediction under the rates its theta implies (Saerens et al.'s formula, ``adjust``), which
carries the shift to the experts correlated with the one that moved; the independent logit
shift does not, and lost with the true theta on such shifts. If it fails, the free tilt
decides as above (``tilt_choose``). The thresholds are the tests' own quantiles at the same
alpha; the model was built on seeds 1-2 of the simulated shifts and checked on seeds 3-6.

With the training table at hand (``data``, or the shorthand tables the router records) the
CLI's default method is the tilt; without it, the MAP EM.
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


def _tilt_weights(y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Normalised row weights exp(theta . y_i) / sum."""
    lw = y @ theta
    lw = lw - lw.max()
    w = np.exp(lw)
    return w / w.sum()


def fit_tilt(new: np.ndarray, val: np.ndarray, y: np.ndarray, ridge: float = 1.0, spread: float = 0.0) -> tuple[np.ndarray, float, float]:
    """Label shift by exponential tilt, by the method of moments: (theta (E,), J at theta, J at 0).

    ``val`` (n, m): features of the training rows (out-of-fold predictions, prompt-shape
    features); ``y`` (n, E): their correctness; ``new`` (n', m): the same features on the new
    prompts. theta minimises J(theta) + ridge |theta|^2 + spread |theta - mean(theta)|^2, where
    J is the squared distance between the mean of ``new`` and the exp(theta . y)-weighted mean
    of ``val``, each moment divided by the variance of that difference (diagonal: the
    moments' correlations are ignored). ``spread`` penalises differences between the experts'
    tilts only: a uniform tilt (traffic harder or easier for every expert) changes no choice."""
    new, val, y = (np.asarray(a, dtype=np.float64) for a in (new, val, y))
    e = y.shape[1]
    theta, j_fit, j = _fit_moments(new, val, y, np.eye(e), ridge, spread)
    return theta, j_fit, j(np.zeros(e))


def _fit_moments(new: np.ndarray, val: np.ndarray, y: np.ndarray, basis: np.ndarray, ridge: float, spread: float = 0.0) -> tuple[np.ndarray, float, Any]:
    """``fit_tilt``'s fit with theta = ``basis`` @ c (E x b): (theta, J(theta), J). The ridge
    acts on c, the spread on theta's differences; c is bounded to [-5, 5]."""
    from scipy.optimize import minimize

    e = y.shape[1]
    m = new.mean(axis=0)
    v = new.var(axis=0) / len(new) + val.var(axis=0) / len(val) + 1e-8
    centre = np.eye(e) - 1.0 / e

    def j_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = _tilt_weights(y, theta)
        mu = w @ val
        r = (mu - m) / v
        dmu = (val * w[:, None]).T @ (y - w @ y)  # (m, E): d mu / d theta
        return float(((mu - m) ** 2 / v).sum()), 2.0 * dmu.T @ r

    def objective(c: np.ndarray) -> tuple[float, np.ndarray]:
        theta = basis @ c
        val_, grad = j_grad(theta)
        d = centre @ theta
        return val_ + ridge * float(c @ c) + spread * float(d @ d), basis.T @ (grad + 2.0 * spread * (centre @ d)) + 2.0 * ridge * c

    res = minimize(objective, np.zeros(basis.shape[1]), jac=True, method="L-BFGS-B", bounds=[(-5.0, 5.0)] * basis.shape[1])
    theta = basis @ res.x
    return theta, j_grad(theta)[0], lambda t: j_grad(np.asarray(t, dtype=np.float64))[0]


def tilt_adjust(pred: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """P(right) under the tilted traffic: sigmoid(logit p + theta) per expert."""
    p = np.clip(np.asarray(pred, dtype=np.float64), _EPS, 1 - _EPS)
    z = np.log(p / (1 - p)) + np.asarray(theta, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-z))


@dataclasses.dataclass
class TiltCalibration:
    """What ``method='tilt'`` learns from the training table: the router's out-of-fold
    predictions, the rows' correctness, and the prompts' shape (k-means cell and leading
    principal components in an encoder's space)."""

    oof: np.ndarray
    """(n, E) predictions for each training row by a router fitted without its fold."""
    y: np.ndarray
    """(n, E) the rows' scores (clipped to [0, 1])."""
    shape: np.ndarray
    """(n, K + P) the training prompts' cell (one-hot) and principal components."""
    centroids: np.ndarray
    """(K, d) cell centres."""
    basis: np.ndarray
    """(d, P) principal directions (of the centred training vectors)."""
    centre: np.ndarray
    """(d,) mean training vector."""
    encoder: Any
    folds: int

    def shape_of(self, prompts: Sequence[str]) -> np.ndarray:
        """(n, K + P) the shape features of new prompts."""
        return self.shape_of_vectors(self.encoder.encode(list(prompts)).astype(np.float64))

    def shape_of_vectors(self, x: np.ndarray) -> np.ndarray:
        from routers.learned import _nearest

        cells = np.eye(len(self.centroids))[_nearest(x, self.centroids)]
        return np.hstack([cells, (x - self.centre) @ self.basis])

    @property
    def degrees(self) -> int:
        """Independent shape moments: the cells' proportions sum to one."""
        return self.shape.shape[1] - 1


def tilt_calibration(router: Router, table: Any, folds: int = 5, clusters: int = 16, components: int = 16, encoder: str = "minilm", seed: int = 0, where: str = "router") -> TiltCalibration:
    """Refit ``router``'s own configuration in ``folds`` stratified folds of ``table`` (its
    training rows) for out-of-fold predictions; describe the prompts by ``clusters`` k-means
    cells and ``components`` principal components of ``encoder``'s vectors."""
    from sklearn.cluster import KMeans

    from routers.encoders import make_encoder

    if folds < 2:
        raise RouterError(f"--folds: expected at least 2, found {folds}")
    if clusters < 2:
        raise RouterError(f"--clusters: expected at least 2, found {clusters}")
    if components < 0:
        raise RouterError(f"--components: expected a number >= 0, found {components}")
    if len(table) < max(2 * folds, 2 * clusters):
        raise RouterError(f"{where}: method 'tilt' needs at least {max(2 * folds, 2 * clusters)} training rows for {folds} folds and {clusters} cells, found {len(table)}")
    if list(table.experts) != list(router.experts):
        raise RouterError(f"{where}: the table's experts {list(table.experts)} differ from the router's {list(router.experts)}")
    klass = type(router)
    fields = {f.name for f in dataclasses.fields(klass.config_cls)}
    hp = {k: v for k, v in router.hyperparameters().items() if k in fields}
    oof = np.zeros(table.scores.shape)
    for tr, va in table.folds(folds, seed):
        r = klass(klass.config_cls(**hp)).fit(table.subset(tr))
        oof[va] = r.predict([table.prompts[i] for i in va])
    enc = make_encoder(encoder)
    if hasattr(enc, "fit"):
        enc.fit(table.prompts)
    x = enc.encode(table.prompts).astype(np.float64)
    km = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(x)
    centre = x.mean(axis=0)
    p = min(components, x.shape[1], len(x) - 1)
    basis = np.linalg.svd(x - centre, full_matrices=False)[2][:p].T if p > 0 else np.zeros((x.shape[1], 0))
    cal = TiltCalibration(oof=oof, y=np.clip(table.scores, 0.0, 1.0), shape=np.zeros((len(x), 0)), centroids=km.cluster_centers_, basis=basis, centre=centre, encoder=enc, folds=folds)
    cal.shape = cal.shape_of_vectors(x)
    return cal


def tilt_routing_gain(cal: TiltCalibration, theta: np.ndarray) -> tuple[float, float]:
    """(gain, standard error): how much better the tilt-adjusted out-of-fold predictions route
    the training rows than the unadjusted ones, each row weighted by exp(theta . y) (the
    training traffic reweighted to the estimated shift), scored by the rows' own correctness."""
    return _routing_gain(cal, theta, tilt_adjust(cal.oof, theta))


def tilt_estimate(pred: np.ndarray, new_shape: np.ndarray, cal: TiltCalibration, ridge: float = 1.0, spread: float = 20.0, alpha: float = 0.1, min_gain: float = 1.0) -> dict[str, Any]:
    """theta and the three tests (module docstring) for new prompts with predictions ``pred``
    and shape features ``new_shape``: {'theta', 'applied', 'passed' (each test's outcome:
    'shape', 'shift', 'routing'), 'j_shape', 'j_shape_limit', 'j_gain', 'j_gain_limit',
    'routing_gain', 'routing_gain_se', 'priors', 'reason'}."""
    from scipy.stats import chi2

    theta, j_fit, j_zero = fit_tilt(pred, cal.oof, cal.y, ridge, spread)
    _, j_shape, _ = fit_tilt(np.hstack([pred, new_shape]), np.hstack([cal.oof, cal.shape]), cal.y, ridge, spread)
    e = cal.y.shape[1]
    shape_limit, gain_limit = float(chi2.ppf(1 - alpha, cal.degrees)), float(chi2.ppf(1 - alpha, e))
    label_shift = j_shape < shape_limit
    shifted = j_zero - j_fit > gain_limit
    gain, gain_se = tilt_routing_gain(cal, theta)
    helps = gain > min_gain * gain_se and gain > 0
    applied = bool(label_shift and shifted and helps)
    if not label_shift:
        reason = f"the new prompts differ from the training prompts in a way no reweighting of the experts' correctness explains (J {j_shape:.1f} >= {shape_limit:.1f}): a change of prompt mix, which the router's per-prompt predictions already follow; left as it was"
    elif not shifted:
        reason = f"no significant change in how often the experts are right (fit gain {j_zero - j_fit:.1f} < {gain_limit:.1f}); left as it was"
    elif not helps:
        reason = f"the adjusted predictions would not route the training rows, reweighted to the estimated shift, better than the router does (routing gain {gain:+.4f}, {min_gain:g} x its standard error {min_gain * gain_se:.4f}); left as it was"
    else:
        reason = f"label shift (prompt shape J {j_shape:.1f} < {shape_limit:.1f}; fit gain {j_zero - j_fit:.1f} > {gain_limit:.1f}; routing gain {gain:+.4f} > {min_gain:g} x {gain_se:.4f}): predictions adjusted"
    priors = _tilt_weights(cal.y, theta) @ cal.y
    return {"theta": theta, "applied": applied, "passed": {"shape": label_shift, "shift": shifted, "routing": helps}, "j_shape": j_shape, "j_shape_limit": shape_limit, "j_gain": j_zero - j_fit, "j_gain_limit": gain_limit, "routing_gain": gain, "routing_gain_se": gain_se, "priors": priors, "reason": reason}


def _routing_gain(cal: TiltCalibration, theta: np.ndarray, adjusted: np.ndarray) -> tuple[float, float]:
    """(gain, standard error) of routing the training rows by ``adjusted`` (out-of-fold
    predictions, adjusted) instead of the out-of-fold predictions, each row weighted by
    exp(theta . y), scored by the rows' own correctness."""
    w = _tilt_weights(cal.y, theta)
    rows = np.arange(len(cal.y))
    d = cal.y[rows, np.asarray(adjusted).argmax(1)] - cal.y[rows, np.asarray(cal.oof).argmax(1)]
    gain = float(w @ d)
    return gain, float(np.sqrt(((w * (d - gain)) ** 2).sum()))


def tilt_estimate_one(pred: np.ndarray, new_shape: np.ndarray, cal: TiltCalibration, train_priors: np.ndarray, ridge: float = 1.0, alpha: float = 0.1, min_gain: float = 1.0, experts: Sequence[str] | None = None) -> dict[str, Any]:
    """Label shift in which ONE expert's rate moved against the others: theta = c0 (1, ..., 1)
    + c1 e_k, fitted for each expert k by the moments of ``fit_tilt``; the best-fitting k is
    kept. What the prompts can tell apart (docs/benchmarks.md, "The floor, as a bound"): the
    common change c0 and one expert's own change are well identified, which of the experts
    moved is not always, so four tests decide (level ``alpha``):

    - ``shift``: k's model beats the common change alone by the chi-square(1) quantile at
      alpha / E (E models were tried);
    - ``selection``: it beats the runner-up expert's model by the chi-square(1) quantile;
    - ``shape``: refitted with the prompt-shape moments, it passes ``tilt_estimate``'s
      over-identification test (a change of prompt mix is not label shift);
    - ``routing``: the per-expert re-expression of the predictions under the rates this theta
      implies (``adjust``, Saerens et al.'s formula, which follows the experts' correlation
      through the implied rates) routes the training rows, weighted by exp(theta . y), better
      than the predictions by ``min_gain`` standard errors.

    ``experts`` names the experts in the reasons (else their indices). Returns {'expert'
    (index), 'theta', 'priors' (the implied rates), 'applied', 'passed', 'j_common', 'j_fit',
    'j_runner_up', 'j_shape', 'j_shape_limit', 'j_gain_limit', 'j_margin_limit',
    'routing_gain', 'routing_gain_se', 'reason'}."""
    from scipy.stats import chi2

    pred, oof, y = (np.asarray(a, dtype=np.float64) for a in (pred, cal.oof, cal.y))
    e = y.shape[1]
    one = np.ones((e, 1))

    def basis(k: int) -> np.ndarray:
        return np.hstack([one, np.eye(e)[:, [k]]])

    _, j_common, _ = _fit_moments(pred, oof, y, one, ridge)
    fits = [_fit_moments(pred, oof, y, basis(k), ridge)[:2] for k in range(e)]
    order = np.argsort([f[1] for f in fits], kind="stable")
    k = int(order[0])
    theta, j_fit = fits[k]
    j_runner = float(fits[int(order[1])][1]) if e > 1 else float("inf")
    full_new, full_val = np.hstack([pred, new_shape]), np.hstack([oof, cal.shape])
    _, j_shape, _ = _fit_moments(full_new, full_val, y, basis(k), ridge)
    gain_limit, margin_limit, shape_limit = float(chi2.ppf(1 - alpha / e, 1)), float(chi2.ppf(1 - alpha, 1)), float(chi2.ppf(1 - alpha, cal.degrees))
    priors = _tilt_weights(y, theta) @ y
    gain, gain_se = _routing_gain(cal, theta, adjust(oof, train_priors, priors))
    passed = {"shift": j_common - j_fit > gain_limit, "selection": j_runner - j_fit > margin_limit, "shape": j_shape < shape_limit, "routing": gain > min_gain * gain_se and gain > 0}
    applied = all(passed.values())
    name, runner = (str(experts[k]), str(experts[int(order[1])])) if experts is not None and e > 1 else (f"expert {k}", f"expert {int(order[1]) if e > 1 else k}")
    if not passed["shift"]:
        reason = f"no one expert's rate moved against the others (fit gain {j_common - j_fit:.1f} <= {gain_limit:.1f})"
    elif not passed["selection"]:
        reason = f"which expert moved is unclear ({name}'s fit beats the runner-up {runner}'s by {j_runner - j_fit:.1f} <= {margin_limit:.1f})"
    elif not passed["shape"]:
        reason = f"the new prompts' shape is not what a change of {name}'s rate predicts (J {j_shape:.1f} >= {shape_limit:.1f})"
    elif not passed["routing"]:
        reason = f"the predictions re-expressed for a change of {name}'s rate would not route the reweighted training rows better (routing gain {gain:+.4f}, {min_gain:g} x its standard error {min_gain * gain_se:.4f})"
    else:
        reason = f"{name}'s rate moved against the others' (fit gain {j_common - j_fit:.1f} > {gain_limit:.1f}; {j_runner - j_fit:.1f} ahead of the runner-up; shape J {j_shape:.1f} < {shape_limit:.1f}; routing gain {gain:+.4f} > {min_gain:g} x {gain_se:.4f})"
    return {"expert": k, "theta": theta, "priors": priors, "applied": applied, "passed": passed, "j_common": float(j_common), "j_fit": float(j_fit), "j_runner_up": j_runner, "j_shape": float(j_shape),
            "j_shape_limit": shape_limit, "j_gain_limit": gain_limit, "j_margin_limit": margin_limit, "routing_gain": gain, "routing_gain_se": gain_se, "reason": reason}


def tilt_choose(pred: np.ndarray, new_shape: np.ndarray, cal: TiltCalibration, train_priors: np.ndarray, ridge: float = 1.0, spread: float = 20.0, alpha: float = 0.1, min_gain: float = 1.0, one_expert: bool = True, experts: Sequence[str] | None = None) -> dict[str, Any]:
    """``--method tilt``'s decision: the one-expert model (``tilt_estimate_one``) when it passes
    its tests, else the free tilt (``tilt_estimate``) when it passes its own, else nothing.
    {'model': 'one expert' | 'free' | None, 'applied', 'theta', 'priors', 'one' (the one-expert
    estimate, None without ``one_expert``), 'free' (None when the one-expert model applied),
    'reason'}; ``tilt_apply`` adjusts predictions by it."""
    one = tilt_estimate_one(pred, new_shape, cal, train_priors, ridge, alpha, min_gain, experts) if one_expert and np.shape(cal.y)[1] > 1 else None
    if one is not None and one["applied"]:
        return {"model": "one expert", "applied": True, "theta": one["theta"], "priors": one["priors"], "one": one, "free": None, "reason": one["reason"] + ": predictions re-expressed under the implied rates"}
    free = tilt_estimate(pred, new_shape, cal, ridge, spread, alpha, min_gain)
    reason = free["reason"] if one is None else f"one expert: {one['reason']}; free tilt: {free['reason']}"
    return {"model": "free" if free["applied"] else None, "applied": free["applied"], "theta": free["theta"], "priors": free["priors"], "one": one, "free": free, "reason": reason}


def tilt_apply(pred: np.ndarray, choice: dict[str, Any], train_priors: np.ndarray) -> np.ndarray:
    """Predictions under ``tilt_choose``'s decision: re-expressed under the implied rates
    (one expert), shifted by theta in logit (free), or unchanged."""
    if choice["model"] == "one expert":
        return adjust(pred, train_priors, choice["priors"])
    if choice["model"] == "free":
        return tilt_adjust(pred, choice["theta"])
    return np.asarray(pred)


@dataclasses.dataclass
class AdaptedRouterConfig(RouterConfig):
    """A trained router whose predictions are re-expressed under priors estimated on new traffic."""

    bounds: ClassVar[dict[str, Bound]] = {"min_change": NON_NEGATIVE, "max_iter": AT_LEAST_1, "strength": NON_NEGATIVE}
    encoder: str = "none"
    mode: str = "binary"
    """'binary' (per-expert P(right), score routers), 'multiclass' (the classifier's P(best))
    or 'tilt' (label shift on the joint correctness, fitted against the training table)."""
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
        self.theta = np.zeros(0)
        self.applied = False

    def _fit(self, x: np.ndarray | None, table: Any) -> None:
        raise RouterError("router 'adapted': made by `collab route adapt` (routers.adapt.adapt_router) from a trained router, not trained from a table")

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert self.base is not None
        return self._adjusted(self.base.predict(prompts))

    def _adjusted(self, pred: np.ndarray) -> np.ndarray:
        if not self.applied:
            return pred
        if self.config.mode == "tilt":
            return tilt_adjust(pred, self.theta)
        return adjust(pred, self.train_priors, self.priors, self.config.mode)

    def explain(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        assert self.base is not None
        pred, notes = self.base.explain(list(prompts))
        return np.clip(self._adjusted(pred), 0.0, 1.0), notes

    def _state(self) -> dict[str, np.ndarray]:
        theta = self.theta if len(self.theta) else np.zeros(len(self.priors))
        return {"train_priors": self.train_priors.astype(np.float64), "priors": self.priors.astype(np.float64), "theta": theta.astype(np.float64), "applied": np.array([int(self.applied)], dtype=np.int64)}

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.train_priors, self.priors = t["train_priors"], t["priors"]
        self.theta = t["theta"] if "theta" in t else np.zeros(len(self.priors))
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


def _wrapping(router: Router, config: AdaptedRouterConfig) -> AdaptedRouter:
    """An AdaptedRouter around ``router`` carrying its experts, training-data identity and
    the training facts of its meta (``route eval`` reads them)."""
    ar = AdaptedRouter(config, base=router)
    ar.experts = list(router.experts)
    ar.train_hash, ar.train_prompts = router.train_hash, router.train_prompts
    ar.meta = {k: v for k, v in router.meta.items() if k in ("train_queries", "train_sources", "train_mean_scores", "train_mean_costs", "heldout")}
    return ar


def adapt(router: Router, prompts: Sequence[str], min_change: float = 0.02, max_iter: int = 200, where: str = "router", strength: float = 0.0) -> AdaptedRouter:
    """An AdaptedRouter around ``router`` with priors re-estimated on ``prompts`` (no labels);
    ``strength``: pseudo-observations of the training priors (0: plain EM, see ``em_priors``)."""
    pri, mode = training_priors(router, where)
    new, _, iters = em_priors(router.predict(list(prompts)), pri, mode, max_iter=max_iter, strength=strength)
    ar = _wrapping(router, AdaptedRouterConfig(mode=mode, min_change=min_change, max_iter=max_iter, strength=strength))
    ar.train_priors, ar.priors = pri, new
    change = new - pri
    ar.applied = bool(np.abs(change).max() >= min_change)
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


def _tilt_priors(router: Router, where: str) -> np.ndarray:
    pri, mode = training_priors(router, where)
    if mode != "binary":
        raise RouterError(f"{where}: method 'tilt' adjusts per-expert P(right); the {router.key} router predicts P(best expert), adapt it with --method em")
    return pri


def adapt_tilt(router: Router, prompts: Sequence[str], cal: TiltCalibration, ridge: float = 1.0, spread: float = 20.0, alpha: float = 0.1, where: str = "router", min_gain: float = 1.0, one_expert: bool = True) -> AdaptedRouter:
    """An AdaptedRouter around ``router`` by ``method='tilt'`` (module docstring): label shift
    on the joint correctness of the experts, fitted against ``cal`` (``tilt_calibration``);
    first the one-expert model (unless ``one_expert`` is False), then the free tilt
    (``tilt_choose``)."""
    pri = _tilt_priors(router, where)
    if ridge < 0 or spread < 0:
        raise RouterError(f"--ridge, --spread: expected numbers >= 0, found {ridge}, {spread}")
    if not 0.0 < alpha < 1.0:
        raise RouterError(f"--alpha: expected 0 < alpha < 1, found {alpha}")
    if min_gain < 0:
        raise RouterError(f"--min-gain: expected a number >= 0, found {min_gain}")
    prompts = list(prompts)
    ch = tilt_choose(router.predict(prompts), cal.shape_of(prompts), cal, pri, ridge, spread, alpha, min_gain, one_expert, router.experts)
    # the one-expert model re-expresses each expert's P(right) under its implied rate: the EM's 'binary' adjustment
    ar = _wrapping(router, AdaptedRouterConfig(mode="binary" if ch["model"] == "one expert" else "tilt"))
    ar.train_priors, ar.priors, ar.theta, ar.applied = pri, ch["priors"], ch["theta"], ch["applied"]
    one, free = ch["one"], ch["free"]
    ar.meta["adapted"] = {
        "method": "label shift on the experts' joint correctness (exponential tilt, method of moments on out-of-fold predictions): one expert's rate against the others, else a free tilt; tested against a change of prompt mix",
        "model": ch["model"],
        "base": router.key,
        "prompts": len(prompts),
        "iterations": 0,
        "applied": ar.applied,
        "folds": cal.folds,
        "clusters": len(cal.centroids),
        "components": int(cal.basis.shape[1]),
        "ridge": ridge,
        "spread": spread,
        "alpha": alpha,
        "min_gain": min_gain,
        "one_expert": None if one is None else {
            "expert": router.experts[one["expert"]],
            "applied": one["applied"],
            "passed": one["passed"],
            "tests": {k: float(one[k]) for k in ("j_common", "j_fit", "j_runner_up", "j_gain_limit", "j_margin_limit", "j_shape", "j_shape_limit", "routing_gain", "routing_gain_se")},
            "reason": one["reason"],
        },
        "tests": None if free is None else {k: float(free[k]) for k in ("j_shape", "j_shape_limit", "j_gain", "j_gain_limit", "routing_gain", "routing_gain_se")},
        "priors": {e: {"train": float(a), "new": float(b), "change": float(b - a), "theta": float(t)} for e, a, b, t in zip(router.experts, pri, ch["priors"], ch["theta"])},
        "reason": ch["reason"],
    }
    return ar


def recorded_tables(router: Router) -> list[str] | None:
    """The training tables ``router`` records, when every one is a shorthand that can be
    loaded again (``llmrouter``, ...); None otherwise (a file is recorded by name and
    SHA-256 only, not where it is)."""
    src = router.meta.get("train_sources")
    if not isinstance(src, list) or not src or any(not isinstance(s, dict) or s.get("kind") != "shorthand" for s in src):
        return None
    return [str(s["name"]) for s in src]


def adapt_router(
    router_dir: str | os.PathLike[str],
    prompts_file: str | os.PathLike[str],
    out: str | os.PathLike[str],
    min_change: float = 0.02,
    overwrite: bool = False,
    device: str = "cpu",
    strength: float | None = None,
    method: str | None = None,
    data: Sequence[str] = (),
    folds: int = 5,
    clusters: int = 16,
    components: int = 16,
    encoder: str = "minilm",
    ridge: float = 1.0,
    spread: float = 20.0,
    alpha: float = 0.1,
    min_gain: float = 1.0,
    one_expert: bool = True,
) -> AdaptedRouter:
    """``collab route adapt``: load the router in ``router_dir``, adapt it to the prompts of
    ``prompts_file`` and save it to ``out`` (with the base's held-out ids, so ``route eval``
    scores the same rows).

    ``method`` 'tilt' (the default whenever the training table is at hand: ``data``, or
    else the tables the router records, when all are shorthands such as ``llmrouter``):
    label shift on the joint correctness, calibrated on the rows of that table the router
    was trained on (``folds`` refits of the router; ``clusters`` cells and ``components``
    principal components in ``encoder``'s space; ``one_expert``: try the one-expert model
    first, ``tilt_choose``). 'em' (the default otherwise): per-expert
    EM; ``strength`` (pseudo-observations of the training rates in its MAP estimate)
    defaults to the router's number of training queries, the sample its training rates were
    measured on (or the number of new prompts if it records none); 0 is Saerens et al.'s
    plain EM."""
    from collab.io import atomic_directory
    from routers.api import HELDOUT_FILE, check_output_dir

    out_p = check_output_dir(out, overwrite)
    if min_change < 0:
        raise RouterError(f"--min-change: expected a number >= 0, found {min_change}")
    if strength is not None and strength < 0:
        raise RouterError(f"--strength: expected a number >= 0, found {strength}")
    if method not in (None, "em", "tilt"):
        raise RouterError(f"--method: expected 'em' or 'tilt', found {method!r}")
    if method == "em" and data:
        raise RouterError("--data: only --method tilt uses the training table; leave out --method em (with --data the method is tilt) or --data")
    base = Router.load(router_dir).to(device)
    names = recorded_tables(base) if not data and method != "em" else None
    recorded = names is not None
    if names is not None:
        data = names
    method = method or ("tilt" if data else "em")
    if method == "tilt" and not data:
        files = ", ".join(f"'{s.get('name')}'" for s in base.meta.get("train_sources") or [] if isinstance(s, dict)) or "nothing"
        raise RouterError(f"--method tilt: needs the router's training table (--data TABLE) for its out-of-fold calibration; {router_dir} records {files} (files by name and SHA-256 only, not where they are)")
    prompts = read_prompts(prompts_file)
    if method == "tilt":
        from routers.api import trained_rows
        from routers.table import load_tables

        table = load_tables(list(data))
        rows = trained_rows(base, table)
        if rows is None or not rows.any():
            if recorded:
                raise RouterError(f"{router_dir}: none of the {len(table)} rows of its recorded training table {', '.join(data)} is a prompt it was trained on (the table changed since); pass its training table with --data, or --method em")
            raise RouterError(f"{router_dir}: none of the {len(table)} rows of {', '.join(map(str, data))} is a prompt this router was trained on; --data must be its training table")
        _tilt_priors(base, str(router_dir))  # refuse an adapted or classifier router before the refits
        cal = tilt_calibration(base, table.subset(np.flatnonzero(rows)), folds, clusters, components, encoder, seed=int(getattr(base.config, "seed", 0)), where=str(router_dir))
        ar = adapt_tilt(base, prompts, cal, ridge, spread, alpha, where=str(router_dir), min_gain=min_gain, one_expert=one_expert)
    else:
        if strength is None:
            n = base.meta.get("train_queries")
            strength = float(n) if isinstance(n, (int, float)) and n > 0 else float(len(prompts))
        ar = adapt(base, prompts, min_change=min_change, where=str(router_dir), strength=strength)
    ar.meta["adapted"]["prompts_file"] = Path(prompts_file).name
    if method == "tilt":
        ar.meta["adapted"]["calibration"] = {"tables": [str(d) if recorded else Path(d).name for d in data], "from": "recorded" if recorded else "--data"}
    with atomic_directory(out_p, overwrite=overwrite) as tmp:
        ar.save_into(tmp)
        held = Path(router_dir) / HELDOUT_FILE
        if held.is_file():
            shutil.copyfile(held, tmp / HELDOUT_FILE)
    return ar
