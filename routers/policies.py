"""Policies: from predicted scores (and costs) to a choice of expert, with a reason.

- ``best``: the highest predicted quality.
- ``cost``: the highest predicted quality - lambda * cost.
- ``budget``: at most a share of queries to the expensive expert; the margin
  threshold is calibrated on validation predictions, the achieved share reported on test.
- ``cascade``: answer with the cheap expert and escalate when its own confidence
  (mean token log-probability of its answer) is below a calibrated threshold.
The RoutedSystem falls back to the next-ranked expert when the chosen one fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from collab.errors import CollabError


class PolicyError(CollabError, ValueError):
    """A policy configuration that does not fit the router's experts."""


def best_quality(pred: np.ndarray) -> np.ndarray:
    """(n,) index of the highest predicted score."""
    return np.asarray(pred).argmax(axis=1)


def quality_minus_cost(pred: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """(n,) argmax of predicted score - lam * cost; ties go to the cheaper expert."""
    pred = np.asarray(pred, dtype=np.float64)
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), pred.shape)
    util = pred - lam * costs - 1e-9 * costs
    return util.argmax(axis=1)


@dataclass
class Decision:
    """One routing decision: the ranked experts (first = chosen) and why."""

    ranking: list[int]
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)
    """More for the trace (e.g. ``guard``: the out-of-distribution guard's verdict)."""


def annotate(decision: Decision, note: dict[str, Any]) -> None:
    """Put a router's note (e.g. the out-of-distribution guard's verdict) into a decision:
    under ``guard`` in the trace, and in front of the reason when the guard changed the prediction."""
    decision.extra["guard"] = note
    if note.get("weight", 1.0) < 1.0 and note.get("reason"):
        decision.reason = f"{note['reason']}; {decision.reason}"


class Policy:
    """Turns (n, E) predictions into decisions. ``name`` goes into traces."""

    name = "policy"

    def decide(self, pred: np.ndarray, experts: Sequence[str], costs: np.ndarray | None = None) -> list[Decision]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _ranking(util: np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-util, kind="stable")]


class BestQualityPolicy(Policy):
    """Pick the expert with the highest predicted score."""

    name = "best"

    def decide(self, pred: np.ndarray, experts: Sequence[str], costs: np.ndarray | None = None) -> list[Decision]:
        out = []
        for row in np.asarray(pred):
            rank = _ranking(row)
            second = f", next {experts[rank[1]]} at {row[rank[1]]:.3f}" if len(rank) > 1 else ""
            out.append(Decision(rank, f"highest predicted score: {experts[rank[0]]} at {row[rank[0]]:.3f}{second}"))
        return out


@dataclass
class CostPolicy(Policy):
    """Pick argmax of predicted score - lam * cost (cost per expert, e.g. relative price).

    ``costs`` given here (a spec's ``policy.costs``) win over the ones ``decide`` is
    passed (a RoutedSystem passes the router's mean training costs); with neither it
    is a PolicyError, not a silent ranking by score alone."""

    lam: float = 0.1
    costs: Sequence[float] | None = None
    name: str = "cost"

    def decide(self, pred: np.ndarray, experts: Sequence[str], costs: np.ndarray | None = None) -> list[Decision]:
        chosen = self.costs if self.costs is not None else costs
        if chosen is None:
            raise PolicyError(f"policy 'cost': no cost for the experts ({', '.join(experts)}); give policy.costs, or use a router that records its training costs")
        c = np.asarray(chosen, dtype=np.float64)
        if c.ndim == 0 or c.shape[-1] != len(experts):
            raise PolicyError(f"policy 'cost': expected {len(experts)} costs ({', '.join(experts)}), found {c.shape[-1] if c.ndim else 1}")
        pred = np.asarray(pred, dtype=np.float64)
        cost = np.broadcast_to(c, pred.shape)  # (n, E): one cost per expert, or per query and expert
        util = pred - self.lam * cost
        out = []
        for row, u, cr in zip(pred, util, cost):
            rank = _ranking(u - 1e-9 * cr)  # ties go to the cheaper expert
            terms = [f"{experts[j]} ({row[j]:.3f} - {self.lam:g} x {cr[j]:g} = {u[j]:.3f})" for j in rank[:2]]
            second = f", next {terms[1]}" if len(terms) > 1 else ""
            out.append(Decision(rank, f"best score - {self.lam:g} x cost: {terms[0]}{second}"))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.lam, "costs": list(map(float, self.costs)) if self.costs is not None else None}


@dataclass
class BudgetPolicy(Policy):
    """At most ``share`` of queries go to ``expensive``: it wins only when its predicted
    margin over the best other expert exceeds ``threshold`` (see ``calibrate``)."""

    expensive: int = 0
    share: float = 0.2
    threshold: float = 0.0
    name: str = "budget"
    calibrated_share: float | None = field(default=None)

    @staticmethod
    def margin(pred: np.ndarray, expensive: int) -> np.ndarray:
        pred = np.asarray(pred, dtype=np.float64)
        others = np.delete(pred, expensive, axis=1)
        return pred[:, expensive] - others.max(axis=1)

    def calibrate(self, val_pred: np.ndarray) -> "BudgetPolicy":
        """Set the threshold so that ``share`` of the validation queries pass it."""
        m = np.sort(self.margin(val_pred, self.expensive))[::-1]
        k = int(np.floor(self.share * len(m)))
        if k <= 0:
            self.threshold = float(m[0]) + 1e-9 if len(m) else float("inf")
        elif k >= len(m):
            self.threshold = float(m[-1]) - 1e-9
        else:
            self.threshold = float((m[k - 1] + m[k]) / 2)
        self.calibrated_share = float((self.margin(val_pred, self.expensive) > self.threshold).mean())
        return self

    def choices(self, pred: np.ndarray) -> np.ndarray:
        pred = np.asarray(pred, dtype=np.float64)
        masked = pred.copy()
        masked[:, self.expensive] = -np.inf
        ch = masked.argmax(axis=1)
        ch[self.margin(pred, self.expensive) > self.threshold] = self.expensive
        return ch

    def decide(self, pred: np.ndarray, experts: Sequence[str], costs: np.ndarray | None = None) -> list[Decision]:
        ch = self.choices(pred)
        m = self.margin(pred, self.expensive)
        out = []
        for i, row in enumerate(np.asarray(pred)):
            rank = [int(ch[i])] + [j for j in _ranking(row) if j != ch[i]]
            verdict = "above" if ch[i] == self.expensive else "not above"
            out.append(Decision(rank, f"budget {self.share:.0%} for {experts[self.expensive]}: margin {m[i]:+.3f} {verdict} threshold {self.threshold:+.3f}"))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "expensive": self.expensive, "share": self.share, "threshold": self.threshold}


@dataclass
class CascadePolicy(Policy):
    """Answer with ``cheap``; escalate to ``strong`` when the cheap answer's confidence
    (mean token log-probability) is below ``threshold``. Decided after generation,
    so ``decide`` ranks cheap first and ``escalate`` makes the call."""

    cheap: int = 0
    strong: int = 1
    threshold: float = -1.0
    name: str = "cascade"

    def decide(self, pred: np.ndarray, experts: Sequence[str], costs: np.ndarray | None = None) -> list[Decision]:
        rest = [j for j in range(len(experts)) if j not in (self.cheap, self.strong)]
        return [Decision([self.cheap, self.strong] + rest, f"cascade: try {experts[self.cheap]} first") for _ in range(len(pred))]

    def escalate(self, confidence: float) -> bool:
        return bool(confidence < self.threshold)

    def calibrate(self, confidence: np.ndarray, cheap_score: np.ndarray, strong_score: np.ndarray, max_escalation: float = 0.5) -> "CascadePolicy":
        """Pick the threshold that maximises validation quality among thresholds that
        escalate at most ``max_escalation`` of the queries."""
        conf = np.asarray(confidence, dtype=np.float64)
        cands = np.concatenate([[-np.inf], np.unique(conf), [np.inf]])
        best, best_t = -np.inf, -np.inf
        for t in cands:
            esc = conf < t
            if esc.mean() > max_escalation + 1e-12:
                continue
            q = np.where(esc, strong_score, cheap_score).mean()
            if q > best + 1e-12:
                best, best_t = q, t
        self.threshold = float(best_t) if np.isfinite(best_t) else (-1e9 if best_t < 0 else 1e9)
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "cheap": self.cheap, "strong": self.strong, "threshold": self.threshold}


#: The keys each policy type accepts in a spec's ``policy:`` mapping.
POLICY_KEYS: dict[str, tuple[str, ...]] = {
    "best": ("type",),
    "cost": ("type", "lambda", "costs"),
    "budget": ("type", "expensive", "share", "threshold"),
    "cascade": ("type", "cheap", "strong", "threshold"),
}


def parse_costs(value: Any, experts: Sequence[str], where: str = "costs") -> list[float]:
    """Per-expert costs, in ``experts`` order, from a spec's mapping ``{expert: cost >= 0}``
    (or a list in that order). ``where`` names the key in errors (``policy.costs``)."""
    if isinstance(value, dict):
        missing = [e for e in experts if e not in value]
        if missing:
            raise PolicyError(f"{where}: no cost for expert '{missing[0]}'; expected one for each of {', '.join(experts)}")
        unknown = [str(e) for e in value if e not in experts]
        if unknown:
            raise PolicyError(f"{where}.{unknown[0]}: not one of the router's experts ({', '.join(experts)})")
        items = [(f"{where}.{e}", value[e]) for e in experts]
    elif isinstance(value, (list, tuple)):
        if len(value) != len(experts):
            raise PolicyError(f"{where}: expected {len(experts)} costs ({', '.join(experts)}), found {len(value)}")
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        raise PolicyError(f"{where}: expected a mapping {{expert: cost >= 0}}, found {value!r}")
    for key, v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise PolicyError(f"{key}: expected a number >= 0, found {v!r}")
    return [float(v) for _, v in items]


def make_policy(config: Any, experts: Sequence[str], costs: Sequence[float] | None = None, source: str | None = None) -> Policy:
    """A policy from a spec value: 'best', {'type': 'cost', 'lambda': .., 'costs': ..},
    {'type': 'budget', 'expensive': NAME, 'share': .., 'threshold': ..}, {'type': 'cascade',
    'cheap': NAME, 'strong': NAME, 'threshold': ..}. A key the type does not take, or a value
    of the wrong kind, is a PolicyError naming it (prefixed by ``source``, e.g. the file)."""
    at = f"{source}: " if source else ""
    if config is None or config == "best":
        return BestQualityPolicy()
    if isinstance(config, str):
        config = {"type": config}
    if not isinstance(config, dict) or "type" not in config:
        raise PolicyError(f"{at}policy: expected 'best' or a mapping with 'type', found {config!r}")
    kind = config["type"]
    if kind not in POLICY_KEYS:
        raise PolicyError(f"{at}policy.type: unknown policy {kind!r}; expected one of {', '.join(POLICY_KEYS)}")
    unknown = sorted(set(config) - set(POLICY_KEYS[kind]), key=str)
    if unknown:
        raise PolicyError(f"{at}policy.{unknown[0]}: unknown key for policy type '{kind}'; allowed keys: {', '.join(POLICY_KEYS[kind])}")

    def idx(key: str) -> int:
        name = config.get(key)
        if name not in experts:
            raise PolicyError(f"{at}policy.{key}: unknown expert {name!r}; router experts: {', '.join(experts)}")
        return list(experts).index(name)

    def number(key: str, default: float, low: float | None = None, high: float | None = None) -> float:
        v = config.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise PolicyError(f"{at}policy.{key}: expected a number, found {v!r}")
        if (low is not None and v < low) or (high is not None and v > high):
            span = f"in [{low:g}, {high:g}]" if low is not None and high is not None else f">= {low:g}"
            raise PolicyError(f"{at}policy.{key}: expected a number {span}, found {v!r}")
        return float(v)

    if kind == "best":
        return BestQualityPolicy()
    if kind == "cost":
        c = parse_costs(config["costs"], experts, f"{at}policy.costs") if "costs" in config else costs
        return CostPolicy(lam=number("lambda", 0.1, low=0.0), costs=c)
    if kind == "budget":
        return BudgetPolicy(expensive=idx("expensive"), share=number("share", 0.2, 0.0, 1.0), threshold=number("threshold", 0.0))
    cheap, strong = idx("cheap"), idx("strong")
    if cheap == strong:
        raise PolicyError(f"{at}policy.strong: expected an expert other than the cheap one, found {experts[strong]!r} for both")
    return CascadePolicy(cheap=cheap, strong=strong, threshold=number("threshold", -1.0))
