"""Coefficient search: tune the per-model ``weight`` of a merge against
perplexity on the user's text, or against accuracy on a collab benchmark
(``search.benchmark``, e.g. ``skill:mixed-dev``, first ``search.limit``
examples, scored by ``evals.evaluate``), then merge with the best weights.

- ``grid``: every weight vector on a grid (the simplex when the method
  normalises weights, e.g. ``linear``; the cube [0, 1]^n otherwise).
- ``greedy``: greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482):
  models sorted by their own score, each kept if adding it (uniform weights)
  lowers perplexity.
- ``cmaes``: CMA-ES (Hansen 2016, https://arxiv.org/abs/1604.00772) over the
  weights from every weight at 1/n (scored first), then ``budget`` evaluations.

With ``search.layers: G`` (cmaes only) each model gets one weight per block
of consecutive decoder layers (G blocks of near-equal size, as in per-layer
evolutionary merging): n x G weights are searched. Tensors outside the
decoder layers (embeddings, final norm, output head) take the mean of the
model's block weights. The merge written uses mergekit's filter syntax
(``weight: [{filter: ".layers.0.", value: ...}, ..., {value: mean}]``), so the
tensor-to-weight rule of the search and of the final merge is the same.

Every candidate is merged in memory by the merge engine's
``merge_state_dicts`` (the same tensor plan and kernels as the merge written
at the end, so any method with a per-model ``weight`` works, e.g. linear,
task_arithmetic, ties, ties_fast, dare_*), loaded into one model and scored
with ``Expert.loglikelihood_rolling``. All inputs are held in memory: meant for
models of up to a few hundred million parameters.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.config import MergePlan
from merging.errors import MergeError

SEARCH_METHODS = ("grid", "greedy", "cmaes")
_FIELDS = {"method", "eval", "samples", "max_length", "step", "budget", "sigma", "benchmark", "limit", "layers"}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class SearchOutcome:
    """The tried points (in order) and the plan with the best weights filled in."""

    plan: MergePlan
    table: list[dict[str, Any]]
    best: dict[str, Any]

    def markdown(self) -> str:
        refs = list(self.best["weights"])
        key = "accuracy" if "accuracy" in self.best else "perplexity"
        lines = ["| # | " + " | ".join(f"w[{r}]" for r in refs) + f" | {key} |", "|---" * (len(refs) + 2) + "|"]
        for row in self.table:
            mark = " **best**" if row is self.best else ""
            lines.append(f"| {row['point']} | " + " | ".join(f"{row['weights'][r]:.3f}" for r in refs) + f" | {row[key]:.4f}{mark} |")
        return "\n".join(lines)


def _searched_refs(plan: MergePlan) -> list[str]:
    refs = [m.ref for m in plan.models]
    if plan.method.base in ("required", "optional") and plan.base_ref is not None:
        refs = [r for r in refs if r != plan.base_ref]
    return refs


def _eval_path(plan: MergePlan) -> Path:
    s = plan.search or {}
    rel = s.get("eval") or plan.parameters.get("calibration")
    if not rel:
        raise MergeError("search.eval: name a .txt or .jsonl file of texts to score merges on (perplexity)")
    p = Path(str(rel)).expanduser()
    for d in ([plan.source_path.parent] if plan.source_path else []) + [Path.cwd()]:
        if not p.is_absolute() and (d / p).exists():
            return (d / p).resolve()
    if p.exists():
        return p
    raise MergeError(f"search.eval: file '{rel}' not found (relative to the config file or the current directory)")


def check_search(plan: MergePlan) -> None:
    """Raise MergeError unless the search block and method can be searched."""
    s = plan.search or {}
    unknown = set(s) - _FIELDS
    if unknown:
        raise MergeError(f"search: unknown field(s) {sorted(unknown)}; expected {sorted(_FIELDS)}")
    if s.get("method") not in SEARCH_METHODS:
        raise MergeError(f"search.method: expected one of {SEARCH_METHODS}, found {s.get('method')!r}")
    p = plan.method.param("weight")
    if plan.method.kernel is None or p is None or not p.per_model:
        raise MergeError(f"search: method '{plan.method.name}' has no per-model 'weight' to search (use linear, task_arithmetic, ties, dare_*, ...)")
    if not plan.models:
        raise MergeError("search: needs 'models:' (slices are not searched)")
    if len(_searched_refs(plan)) < 2:
        raise MergeError("search: needs at least two models whose weights can vary")
    layers = s.get("layers")
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise MergeError(f"search.layers: expected a positive whole number of layer blocks, found {layers!r}")
        if layers > 1 and s["method"] != "cmaes":
            raise MergeError(f"search.layers: per-layer weights are searched with method 'cmaes' only, not {s['method']!r}")
    if s["method"] == "cmaes":
        n = len(_searched_refs(plan)) * int(layers or 1)
        budget = int(s.get("budget", 24))
        if budget < _cmaes_population(n):
            raise MergeError(
                f"search.budget: CMA-ES over {n} weights evaluates {_cmaes_population(n)} points per generation; budget {budget} is less than one generation"
            )
    if s.get("benchmark") is not None:
        from evals.benchmarks import benchmark_names

        if s["benchmark"] not in benchmark_names():
            raise MergeError(f"search.benchmark: unknown benchmark {s['benchmark']!r}; expected one of {', '.join(benchmark_names())}")
        return
    _eval_path(plan)


@dataclass(frozen=True)
class LayerBlocks:
    """Decoder layers 0..n_layers-1 cut into ``len(bounds)`` blocks of
    consecutive layers; ``bounds[b]`` is block b's (first, last) layer."""

    n_layers: int
    bounds: tuple[tuple[int, int], ...]

    @classmethod
    def split(cls, n_layers: int, blocks: int) -> LayerBlocks:
        if blocks > n_layers:
            raise MergeError(f"search.layers: {blocks} blocks asked for, but the models have {n_layers} decoder layers")
        edges = [round(b * n_layers / blocks) for b in range(blocks + 1)]
        return cls(n_layers, tuple((edges[b], edges[b + 1] - 1) for b in range(blocks)))

    def block_of(self, tensor_name: str) -> int | None:
        """The block of a decoder-layer tensor, None for any other tensor."""
        m = _LAYER.search(tensor_name)
        if m is None:
            return None
        layer = int(m.group(1))
        return next(b for b, (lo, hi) in enumerate(self.bounds) if lo <= layer <= hi)

    def label(self, ref: str, b: int) -> str:
        lo, hi = self.bounds[b]
        return f"{ref} layers {lo}-{hi}"

    def setting(self, values: list[float]) -> list[dict[str, Any]]:
        """mergekit's filter list giving layer i its block's value and every other
        tensor the mean of the blocks' values."""
        out: list[dict[str, Any]] = [
            {"filter": f".layers.{i}.", "value": values[b]} for b, (lo, hi) in enumerate(self.bounds) for i in range(lo, hi + 1)
        ]
        return out + [{"value": sum(values) / len(values)}]


def _layer_count(names: Any) -> int:
    found = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    if not found:
        raise MergeError("search.layers: no decoder-layer tensors ('<prefix>.layers.<i>.<name>') found in the models")
    return max(found) + 1


def run_search(plan: MergePlan, *, workdir: Path, quiet: bool, seed: int | None) -> SearchOutcome:
    """Score candidate weights, then return the plan with the best ones."""
    import torch

    from collab.experts import Expert
    from merging.calibration import read_texts
    from merging.engine import merge_state_dicts
    from merging.layout import model_dirs
    from merging.tensorio import ModelReader

    s = plan.search or {}
    bench = s.get("benchmark")
    texts = [] if bench else read_texts(_eval_path(plan), int(s.get("samples", 16)))
    refs = _searched_refs(plan)
    state: dict[str, dict[str, Any]] = {}
    for r, d in model_dirs(plan).items():
        reader = ModelReader(d)
        state[r] = {k: reader.get(k) for k in reader.names()}
        reader.close()
    donor = plan.inputs[plan.base_ref or plan.models[0].ref].path
    expert = Expert.load(donor, name="search")
    n_tokens = sum(len(expert.tokenizer(t).input_ids) for t in texts)
    table: list[dict[str, Any]] = []
    if seed is not None:
        torch.manual_seed(seed)
    n_blocks = int(s.get("layers") or 1)
    blocks = LayerBlocks.split(_layer_count(state[plan.models[0].ref]), n_blocks) if n_blocks > 1 else None

    def candidate(weights: dict[str, float]) -> dict[str, Any]:
        """Each searched model's ``weight`` setting: a number, or with layer
        blocks mergekit's filter list (the rule the written merge uses too)."""
        if blocks is None:
            return dict(weights)
        return {r: blocks.setting([weights[blocks.label(r, b)] for b in range(n_blocks)]) for r in refs}

    def merge_with(weights: dict[str, float]) -> dict[str, Any]:
        return merge_state_dicts(_with_weights(plan, candidate(weights)), state)

    keys = [blocks.label(r, b) for r in refs for b in range(n_blocks)] if blocks else refs

    def score(ws: list[float]) -> float:
        t0 = time.perf_counter()
        weights = dict(zip(keys, (float(w) for w in ws)))
        with torch.no_grad():
            expert.model.load_state_dict(merge_with(weights), strict=False)
        row: dict[str, Any] = {"point": len(table) + 1, "weights": {r: round(float(w), 6) for r, w in weights.items()}}
        if bench:
            from evals import evaluate

            acc = float(evaluate(expert, bench, limit=int(s.get("limit", 30)), progress=False).score)
            row["accuracy"], loss, shown = acc, -acc, f"accuracy {acc:.4f}"
        else:
            nll = -sum(expert.loglikelihood_rolling(t) for t in texts)
            ppl = math.exp(nll / max(1, n_tokens))
            row["perplexity"], loss, shown = ppl, ppl, f"perplexity {ppl:.4f}"
        row["seconds"] = round(time.perf_counter() - t0, 3)
        table.append(row)
        if not quiet:
            import sys

            sys.stderr.write(f"search point {len(table)}: weights {[round(float(w), 3) for w in ws]} {shown}\n")
        return loss

    normalize = plan.parameters.get("normalize", plan.method.param("normalize").default if plan.method.param("normalize") else False)
    normalised = normalize is True or (isinstance(normalize, (int, float, str)) and str(normalize).lower() in ("1", "1.0", "true"))
    kind = s["method"]
    if kind == "grid":
        _grid(score, len(refs), float(s.get("step", 0.25)), normalised, int(s.get("budget", 64)))
    elif kind == "greedy":
        _greedy(score, len(refs))
    else:
        _cmaes(score, len(keys), int(s.get("budget", 24)), float(s.get("sigma", 0.3)), seed, start=1.0 / len(refs))
    best = min(table, key=lambda r: -r["accuracy"] if bench else r["perplexity"])
    return SearchOutcome(_with_weights(plan, candidate(best["weights"]), final=True), table, best)


def _grid(score: Any, n: int, step: float, simplex: bool, budget: int) -> None:
    levels = [round(i * step, 6) for i in range(int(round(1 / step)) + 1)]
    points = [p for p in itertools.product(levels, repeat=n) if sum(p) > 0 and (not simplex or abs(sum(p) - 1) < 1e-6)]
    if len(points) > budget:
        raise MergeError(f"search.step: a grid of step {step} over {n} models has {len(points)} points, more than search.budget={budget}; raise the step or the budget")
    for p in points:
        score(list(p))


def _greedy(score: Any, n: int) -> None:
    alone = [(score([1.0 if j == i else 0.0 for j in range(n)]), i) for i in range(n)]
    order = [i for _, i in sorted(alone)]
    soup, best = [order[0]], min(alone)[0]
    for i in order[1:]:
        trial = soup + [i]
        ppl = score([1.0 / len(trial) if j in trial else 0.0 for j in range(n)])
        if ppl < best:
            soup, best = trial, ppl


def _cmaes(score: Any, n: int, budget: int, sigma: float, seed: int | None, start: float | None = None) -> None:
    """A compact (mu/mu_w, lambda)-CMA-ES over weights clipped to [0, 2], from
    every weight at ``start`` (default 1/n). The starting point itself is scored
    first (not counted in ``budget``), so the search never returns a point that
    scored worse than where it started."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lam = _cmaes_population(n)
    mu = lam // 2
    w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    mueff = 1 / (w**2).sum()
    cc, cs = (4 + mueff / n) / (n + 4 + 2 * mueff / n), (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chin = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    mean, C = np.full(n, 1.0 / n if start is None else start), np.eye(n)
    pc, ps = np.zeros(n), np.zeros(n)
    evals, gen = 0, 0
    score(list(mean))
    while evals + lam <= budget:
        vals, vecs = np.linalg.eigh(C)
        B, D = vecs, np.sqrt(np.maximum(vals, 1e-20))
        z = rng.standard_normal((lam, n))
        y = z @ (B * D).T  # (lam, n)
        x = np.clip(mean + sigma * y, 0.0, 2.0)
        y = (x - mean) / sigma
        f = np.array([score(list(xi)) if xi.sum() > 0 else math.inf for xi in x])
        evals += lam
        gen += 1
        idx = np.argsort(f)[:mu]
        y_w = w @ y[idx]
        mean = mean + sigma * y_w
        inv_sqrt = B @ np.diag(1 / D) @ B.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * inv_sqrt @ y_w
        hsig = np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * gen)) / chin < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + hsig * math.sqrt(cc * (2 - cc) * mueff) * y_w
        C = (1 - c1 - cmu) * C + c1 * np.outer(pc, pc) + cmu * (y[idx].T * w) @ y[idx]
        sigma *= math.exp((cs / damps) * (np.linalg.norm(ps) / chin - 1))


def _cmaes_population(n: int) -> int:
    return 4 + int(3 * math.log(n))


def _with_weights(plan: MergePlan, weights: dict[str, Any], final: bool = False) -> MergePlan:
    """``plan`` with the ``weight`` of each model in ``weights`` set (a number
    or a filter list), its source text rewritten when ``final``."""
    from merging.config import ModelEntry
    from merging.settings import parse

    models = tuple(
        ModelEntry(m.ref, {**m.parameters, "weight": parse(weights[m.ref], f"{m.ref}.weight")}) if m.ref in weights else m
        for m in plan.models
    )
    if not final:
        return plan.with_models(models, plan.source_text)
    new = plan.with_models(models, "")
    text = yaml.safe_dump(new.to_config(), sort_keys=False)
    what = "per-layer-block" if any(isinstance(w, list) for w in weights.values()) else "per-model"
    return plan.with_models(models, f"# {what} weights chosen by collab merge --search\n" + text)
