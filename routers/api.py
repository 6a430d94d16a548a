"""Library functions behind ``collab route train|eval|ask``; the CLI only parses and calls these."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from routers.base import Router, RouterError, make_router, prompt_digest
from routers.metrics import Evaluation, evaluate, plot_curve
from routers.table import RoutingTable, TableError, TableWarning, load_tables


def describe_source(ref: str | os.PathLike[str]) -> dict[str, str]:
    """How a router records a training table, without machine paths: a shorthand by its
    name, a file by its name and the SHA-256 of its bytes."""
    from collab.io import sha256_file
    from routers.table import SHORTHANDS

    key = str(ref)
    if key in SHORTHANDS:
        return {"name": key, "kind": "shorthand"}
    return {"name": Path(key).name, "kind": "file", "sha256": sha256_file(key)}


def check_output_dir(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """``out`` if a router may be written there: it must not exist, or with ``overwrite``
    be a trained router directory (one with config.json) or empty, never any other folder."""
    p = Path(out)
    if not p.exists():
        return p
    if not overwrite:
        raise RouterError(f"{p}: already exists; choose another --out or pass --overwrite to replace it")
    if not p.is_dir() or not ((p / "config.json").is_file() or not any(p.iterdir())):
        raise RouterError(f"{p}: --overwrite replaces only a trained router directory (one with config.json) or an empty one; this is not one, so it is left as it is")
    return p


#: ``--router`` value (and the CLI's default) that chooses the router kind by simulated shift.
AUTO = "auto"


def train_router(
    data: Sequence[str],
    router: str,
    out: str | os.PathLike[str],
    options: dict[str, Any] | None = None,
    test_size: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    log: Any = None,
) -> tuple[Router, RoutingTable | None]:
    """Train ``router`` on the tables ``data`` (paths or shorthands) and save it to ``out``.

    With ``test_size > 0`` a stratified share of queries is held out; it is returned
    (and its query ids written to ``out/heldout_ids.txt``) for an honest ``eval``.
    ``device`` runs the neural encoders (and the bert router's fine-tuning) there.
    ``router='auto'`` chooses the kind by the shift-simulating protocol of ``routers.auto``
    (on the training part only), reporting each candidate's figures through ``log``.
    An existing ``out`` is an error unless ``overwrite``; the directory appears (or is
    replaced) only once everything is written."""
    from collab.io import atomic_directory

    out = check_output_dir(out, overwrite)
    if router == AUTO:
        if options:
            raise RouterError(f"--router auto: takes no -o options (found '{next(iter(options))}'); it chooses among fixed candidates (routers.auto.CANDIDATES); name a router kind to set its options")
        r = None
    else:
        r = make_router(router, seed=seed, **(options or {}))  # refuse bad options before loading data
    table = load_tables(data)
    held: RoutingTable | None = None
    if test_size > 0:
        table, held = table.split(test_size, seed)
    if r is None:
        from routers.auto import select_router
        from routers.encoders import minilm

        minilm().to(device)
        r = select_router(table, seed=seed, log=log)  # on the training part only: the held-out rows stay unseen
    else:
        r.to(device)
        r.fit(table)
    r.meta.update({"train_queries": len(table), "train_sources": [describe_source(d) for d in data], "train_mean_scores": [float(x) for x in table.scores.mean(axis=0)], "train_mean_costs": [float(x) for x in table.costs.mean(axis=0)]})
    r.meta["heldout"] = {"test_size": test_size, "seed": seed, "queries": len(held)} if held is not None else None
    with atomic_directory(out, overwrite=overwrite) as tmp:
        r.save_into(tmp)
        if held is not None:
            (tmp / HELDOUT_FILE).write_text("".join(i + "\n" for i in held.ids), encoding="utf-8")
    return r, held


HELDOUT_FILE = "heldout_ids.txt"


def heldout_part(router_dir: str | os.PathLike[str], table: RoutingTable) -> RoutingTable:
    """The rows of ``table`` whose ids the router held out at training time (all rows if none recorded)."""
    p = Path(router_dir) / HELDOUT_FILE
    if not p.is_file():
        return table
    keep = set(p.read_text(encoding="utf-8").split())
    idx = [i for i, q in enumerate(table.ids) if q in keep]
    return table.subset(idx) if idx else table


def trained_rows(router: Router, table: RoutingTable) -> np.ndarray | None:
    """(n,) bool: which rows of ``table`` have a prompt the router was trained on; None when
    the router records no training prompts and ``table`` is not its exact training table."""
    if router.train_prompts is not None:
        seen = set(router.train_prompts)
        return np.array([prompt_digest(p) in seen for p in table.prompts], dtype=bool)
    if router.train_hash is not None and table.content_hash() == router.train_hash:
        return np.ones(len(table), dtype=bool)
    return None


def evaluate_router(router_dir: str | os.PathLike[str], data: Sequence[str], plot: str | None = None, heldout: bool = True, n_boot: int = 1000, device: str = "cpu") -> Evaluation:
    """Load a router and score it on the rows of ``data`` it was not trained on (its
    held-out part when recorded); optionally plot the curve.

    ``heldout=False`` (``--all``) scores every row; if some are training rows the result
    says so under ``training_rows`` and ``warnings``. With ``heldout`` and no row left
    (trained on the whole table, ``--test-size 0``) it is a RouterError: such figures
    would measure fit, not routing."""
    r = Router.load(router_dir).to(device)
    table = load_tables(data)
    missing = [e for e in r.experts if e not in table.experts]
    if missing:
        raise TableError(
            f"{table.source}: the table lacks expert '{missing[0]}', which the router ({router_dir}) was trained on; "
            f"the table has: {', '.join(table.experts)}; the router needs: {', '.join(r.experts)}"
        )
    table = table.select_experts(r.experts)
    table_rows = len(table)
    notes = list(table.notes)
    warns: list[str] = []
    rows, training, left_out = "all", None, 0
    if heldout:
        held = heldout_part(router_dir, table)
        if len(held) < len(table):
            # The split is by query id, as documented: these rows were not trained on.
            rows, training, table = "held-out", 0, held
        else:
            rows = "untrained"
            if (Path(router_dir) / HELDOUT_FILE).is_file():
                notes.append(f"none of the router's held-out query ids are in {table.source}; scoring the rows it was not trained on")
            mask = trained_rows(r, table)
            if mask is not None and mask.all():
                raise RouterError(
                    f"{router_dir}: was trained on every row of {table.source} ({len(table)}), so scoring them would measure fit, "
                    f"not routing (was it trained with --test-size 0?); retrain with --test-size 0.2 to hold queries out, evaluate on another table, "
                    f"or pass --all to score the training rows anyway"
                )
            if mask is not None:
                training, left_out = 0, int(mask.sum())
            if left_out:
                table = table.subset(np.flatnonzero(~mask))
                notes.append(f"left out {left_out} rows whose prompt the router was trained on")
    else:
        mask = trained_rows(r, table)
        training = int(mask.sum()) if mask is not None else None
        if training:
            warns.append(f"{training} of the {len(table)} scored rows are ones the router was trained on (--all): these figures measure fit, not routing")
            warnings.warn(warns[-1], TableWarning, stacklevel=2)
    if training is None:
        notes.append(f"{router_dir} records no training prompts (trained before collab recorded them), so rows it was trained on cannot be told apart")
    pred = r.predict(table.prompts)
    ev = evaluate(table, pred, n_boot=n_boot)
    ev.data["router"] = r.key
    for k in ("auto", "adapted"):  # how the router was chosen / adapted, shown by `route eval`
        if k in r.meta:
            ev.data[k] = r.meta[k]
    ev.data["router_dir"] = str(router_dir)
    ev.data["data"] = [str(d) for d in data]
    ev.data["rows"] = rows
    ev.data["table_rows"] = table_rows
    ev.data["training_rows"] = training
    ev.data["left_out_training_rows"] = left_out
    ev.data["notes"] = notes
    ev.data["warnings"] = warns
    if plot:
        points = {e: (float(table.costs[:, j].mean()), float(table.scores[:, j].mean())) for j, e in enumerate(table.experts)}
        points["oracle"] = (float(table.costs[np.arange(len(table)), table.scores.argmax(axis=1)].mean()), ev.data["oracle"])
        plot_curve(plot, {r.key: ev.curve}, points, title=f"{r.key} on {', '.join(map(str, data))}")
        ev.data["plot"] = str(plot)
    return ev


def ask(router_dir: str | os.PathLike[str], prompt: str, policy: Any = None, device: str = "cpu") -> dict[str, Any]:
    """Route one prompt as a spec's ``type: route`` system would (``RoutedSystem.explain``,
    the router's training costs for a cost policy): the chosen expert, the ranking, every
    expert's predicted score, the policy and its reason."""
    from collab.system import GenerationRequest
    from routers.policies import make_policy
    from routers.system import RoutedSystem

    r = Router.load(router_dir).to(device)
    system = RoutedSystem(Path(router_dir).name, r, None, policy=make_policy(policy, r.experts))
    return system.explain(GenerationRequest(prompt=prompt))
