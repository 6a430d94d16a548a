"""Library functions behind ``collab route train|eval|ask``; the CLI only parses and calls these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from routers.base import Router, make_router
from routers.metrics import Evaluation, evaluate, plot_curve
from routers.table import RoutingTable, load_tables


def train_router(data: Sequence[str], router: str, out: str | os.PathLike[str], options: dict[str, Any] | None = None, test_size: float = 0.0, seed: int = 0, device: str = "cpu") -> tuple[Router, RoutingTable | None]:
    """Train ``router`` on the tables ``data`` (paths or shorthands) and save it to ``out``.

    With ``test_size > 0`` a stratified share of queries is held out; it is returned
    (and its query ids written to ``out/heldout_ids.txt``) for an honest ``eval``.
    ``device`` runs the neural encoders (and the bert router's fine-tuning) there."""
    table = load_tables(data)
    held: RoutingTable | None = None
    if test_size > 0:
        table, held = table.split(test_size, seed)
    r = make_router(router, seed=seed, **(options or {}))
    r.to(device)
    r.fit(table)
    r.meta.update({"train_queries": len(table), "train_sources": [str(d) for d in data], "train_mean_scores": [float(x) for x in table.scores.mean(axis=0)], "train_mean_costs": [float(x) for x in table.costs.mean(axis=0)]})
    if held is not None:
        r.meta["heldout"] = {"test_size": test_size, "seed": seed, "queries": len(held)}
    r.save(out)
    if held is not None:
        from collab.io import atomic_write_text

        atomic_write_text(Path(out) / "heldout_ids.txt", "".join(i + "\n" for i in held.ids))
    return r, held


def heldout_part(router_dir: str | os.PathLike[str], table: RoutingTable) -> RoutingTable:
    """The rows of ``table`` whose ids the router held out at training time (all rows if none recorded)."""
    p = Path(router_dir) / "heldout_ids.txt"
    if not p.is_file():
        return table
    keep = set(p.read_text(encoding="utf-8").split())
    idx = [i for i, q in enumerate(table.ids) if q in keep]
    return table.subset(idx) if idx else table


def evaluate_router(router_dir: str | os.PathLike[str], data: Sequence[str], plot: str | None = None, heldout: bool = True, n_boot: int = 1000, device: str = "cpu") -> Evaluation:
    """Load a router, score it on ``data`` (its held-out part when recorded), optionally plot the curve."""
    r = Router.load(router_dir).to(device)
    table = load_tables(data)
    if heldout:
        table = heldout_part(router_dir, table)
    table = table.select_experts(r.experts)
    pred = r.predict(table.prompts)
    ev = evaluate(table, pred, n_boot=n_boot)
    ev.data["router"] = r.key
    ev.data["router_dir"] = str(router_dir)
    ev.data["data"] = [str(d) for d in data]
    ev.data["notes"] = table.notes
    if plot:
        points = {e: (float(table.costs[:, j].mean()), float(table.scores[:, j].mean())) for j, e in enumerate(table.experts)}
        points["oracle"] = (float(table.costs[np.arange(len(table)), table.scores.argmax(axis=1)].mean()), ev.data["oracle"])
        plot_curve(plot, {r.key: ev.curve}, points, title=f"{r.key} on {', '.join(map(str, data))}")
        ev.data["plot"] = str(plot)
    return ev


def ask(router_dir: str | os.PathLike[str], prompt: str, policy: Any = None, device: str = "cpu") -> dict[str, Any]:
    """Route one prompt: the chosen expert, every expert's predicted score and the reason."""
    from routers.policies import annotate, make_policy

    r = Router.load(router_dir).to(device)
    pred, notes = r.explain([prompt])
    pol = make_policy(policy, r.experts, r.meta.get("train_mean_costs"))
    d = pol.decide(pred, r.experts, np.asarray(r.meta["train_mean_costs"]) if "train_mean_costs" in r.meta else None)[0]
    if notes[0]:
        annotate(d, notes[0])
    out = {
        "routed_to": r.experts[d.ranking[0]],
        "scores": {e: float(s) for e, s in zip(r.experts, pred[0])},
        "ranking": [r.experts[j] for j in d.ranking],
        "policy": pol.name,
        "reason": d.reason,
        "router": r.key,
    }
    out.update(d.extra)
    return out
