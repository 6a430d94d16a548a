"""A new expert for a population router from a few demonstrations (``collab route add-expert``).

``read_demos`` reads the demonstrations: routing-table rows that hold the new expert's
score (the other experts' scores may be absent). ``add_expert`` turns them into the
expert's context set (stretched with pseudo-labels if asked, ``routers.population``) and
writes the router again with that context added and its weights untouched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from collab.io import jsonl_rows
from routers.base import Router, RouterError, prompt_digest
from routers.population import CONTEXTS_JSON, CONTEXTS_TENSORS, PopulationRouter
from routers.table import TableWarning, _cost_float, _unit_float

DEMO_FIELDS = ("id", "task", "prompt", "scores", "costs")


@dataclasses.dataclass
class Demos:
    """A new expert's demonstrations: routing-table rows that hold its score."""

    ids: list[str]
    prompts: list[str]
    scores: np.ndarray  # (N,) in [0, 1]
    costs: list[float]
    """The expert's cost on the rows that give one."""


def read_demos(path: str | os.PathLike[str], expert: str) -> Demos:
    """Rows of a JSONL routing table whose ``scores`` hold ``expert``'s score (other experts'
    scores may be absent). A field a routing-table row does not have, a row without the
    expert's score, a bad score or a repeated id is a RouterError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise RouterError(f"{p}: demonstrations file not found")
    ids, prompts, scores, costs = [], [], [], []
    seen: dict[str, int] = {}
    for n, obj in jsonl_rows(p, RouterError, lambda n: f"{p}: line {n}"):
        at = f"{p}: line {n}"
        if not isinstance(obj, dict):
            raise RouterError(
                f"{at}: expected a JSON object, found {type(obj).__name__}"
            )
        unknown = sorted(set(obj) - set(DEMO_FIELDS))
        if unknown:
            raise RouterError(
                f"{at}: unknown field '{unknown[0]}'; a demonstration is a routing-table row with some of: {', '.join(DEMO_FIELDS)}"
            )
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RouterError(
                f"{at}: field 'prompt': expected a non-empty string, found {prompt!r}"
            )
        sc = obj.get("scores")
        if not isinstance(sc, dict) or expert not in sc:
            have = ", ".join(sc) if isinstance(sc, dict) and sc else "none"
            raise RouterError(
                f"{at}: scores: no score for expert '{expert}' (the row scores: {have}); every demonstration needs the new expert's score"
            )
        try:
            for name, v in sc.items():
                s = _unit_float(v, f"{at}: scores.{name}")
                if name == expert:
                    scores.append(s)
            co = obj.get("costs") or {}
            if not isinstance(co, dict):
                raise RouterError(
                    f"{at}: field 'costs': expected {{expert: cost >= 0}}, found {co!r}"
                )
            if expert in co:
                costs.append(_cost_float(co[expert], f"{at}: costs.{expert}"))
        except ValueError as e:
            raise RouterError(str(e)) from None
        rid = str(obj.get("id", f"line-{n}"))
        if rid in seen:
            raise RouterError(f"{at}: duplicate id '{rid}' (first at line {seen[rid]})")
        seen[rid] = n
        ids.append(rid)
        prompts.append(prompt)
    if not prompts:
        raise RouterError(
            f"{p}: no demonstrations (expected JSONL routing-table rows with scores.{expert})"
        )
    return Demos(ids, prompts, np.asarray(scores, dtype=np.float64), costs)


def add_expert(
    router_dir: str | os.PathLike[str],
    expert: str,
    demos: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    pseudo_labels: int | None = None,
    cost: float | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> PopulationRouter:
    """``collab route add-expert``: add ``expert`` to the population router in ``router_dir``
    from the demonstrations in ``demos`` and write the result to ``out`` (default: in place).

    The directory is rewritten atomically (a new one renamed into place); ``router.safetensors``
    is copied byte for byte, so no weight changes. The expert's cost (for a cost policy) is
    ``cost``, else its mean cost over the demonstrations that give one, else 1 (with a warning).
    The demonstrations' prompts join ``train_prompts.sha256`` and leave ``heldout_ids.txt``,
    so ``collab route eval`` never scores a row the router has seen the answer to."""
    from collab.io import atomic_directory, atomic_write_json, sha256_file
    from routers.api import HELDOUT_FILE, check_output_dir
    from routers.base import TRAIN_PROMPTS_FILE

    src = Path(router_dir)
    dest = check_output_dir(out, overwrite) if out is not None else src
    r = Router.load(src)
    if not isinstance(r, PopulationRouter):
        raise RouterError(
            f"{src}: a '{r.key}' router cannot take new experts without retraining; train one with --router population (or retrain this one on a table with '{expert}')"
        )
    if not expert.strip():
        raise RouterError("--expert: expected a non-empty name")
    if expert in r.experts:
        raise RouterError(
            f"{src}: already has an expert '{expert}' ({', '.join(r.experts)}); choose another --expert name"
        )
    d = read_demos(demos, expert)
    count = r.config.pseudo_labels if pseudo_labels is None else int(pseudo_labels)
    if count < 0:
        raise RouterError(f"--pseudo-labels: expected a number >= 0, found {count}")
    if cost is not None and not (cost >= 0 and math.isfinite(cost)):
        raise RouterError(f"--cost: expected a finite number >= 0, found {cost}")
    r.to(device)
    x = r.features(d.prompts)
    pool = r.pseudo_pool(x, d.scores, count) if count else None
    if cost is None:
        cost = float(np.mean(d.costs)) if d.costs else 1.0
        if not d.costs:
            warnings.warn(
                f"{demos}: no demonstration gives a cost for '{expert}'; its cost defaults to 1",
                TableWarning,
                stacklevel=2,
            )
    info = {
        "source": "demonstrations",
        "file": Path(demos).name,
        "sha256": sha256_file(demos),
        "demonstrations": len(d.prompts),
        "pseudo_labels": len(pool[0]) if pool is not None else 0,
        "mean_score": float(d.scores.mean()),
        "cost": float(cost),
    }
    r.add_context(expert, x, d.scores, info, pool)
    for key, value in (
        ("train_mean_costs", cost),
        ("train_mean_scores", float(d.scores.mean())),
    ):
        if isinstance(r.meta.get(key), list):
            r.meta[key] = [*r.meta[key], value]
    r.meta.setdefault("added_experts", []).append(
        {k: info[k] for k in ("file", "sha256", "demonstrations", "pseudo_labels")}
        | {"name": expert}
    )
    weights = src / "router.safetensors"
    before = sha256_file(weights)
    seen = sorted(set(r.train_prompts or []) | {prompt_digest(p) for p in d.prompts})
    written = {
        "router.safetensors",
        TRAIN_PROMPTS_FILE,
        HELDOUT_FILE,
        CONTEXTS_JSON,
        CONTEXTS_TENSORS,
        "config.json",
    }
    with atomic_directory(dest, overwrite=True) as tmp:
        shutil.copyfile(
            weights, tmp / "router.safetensors"
        )  # the weights, byte for byte
        (tmp / TRAIN_PROMPTS_FILE).write_text(
            "".join(h + "\n" for h in seen), encoding="utf-8"
        )
        held = src / HELDOUT_FILE
        if held.is_file():
            demo_ids = set(d.ids)
            keep = [
                i for i in held.read_text(encoding="utf-8").split() if i not in demo_ids
            ]
            (tmp / HELDOUT_FILE).write_text(
                "".join(i + "\n" for i in keep), encoding="utf-8"
            )
        for (
            extra
        ) in src.iterdir():  # anything else a user keeps in the router directory
            if extra.name not in written:
                (shutil.copytree if extra.is_dir() else shutil.copy2)(
                    extra, tmp / extra.name
                )
        r.save_contexts(tmp)
        atomic_write_json(tmp / "config.json", r.config_json())
        if (
            sha256_file(tmp / "router.safetensors") != before
        ):  # pragma: no cover - a copy that changed bytes
            raise RouterError(f"{weights}: its copy differs from the original")
    r.train_prompts = seen
    return r
