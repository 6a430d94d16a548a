"""The tensor plan of a merge: every output tensor, the input tensors it is
merged from, its parameters resolved, in the order mergekit runs them.

This is mergekit's planner (``mergekit/plan.py``) for the configs collab's
engine runs: ``models:`` become one slice over every layer (the base model
appended when the config does not list it), each slice maps its sources'
layers to output layers, and a parameter is looked up in the source's, the
slice's, then the top-level ``parameters``, its gradient evaluated at the
layer's position in the slice (0 for the tensors before and after the
layers). The tensors of a layer come from mergekit's architecture definition
of the model (``mergekit/_data/architectures/*.json``, read as data, so
neither mergekit's planner nor transformers is imported); for an architecture
without one, a ``models:`` merge takes the names stored in the files. Tensors
run sorted by input tensor name, as mergekit's executor schedules them, so
that the randomised methods (``dare_*``, ``della*``) draw the same numbers.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from merging.config import MergePlan, OutputSlice, SliceSource
from merging.errors import MergeError
from merging.settings import Setting, evaluate
from merging.tensorio import ModelReader, read_config

#: A transformer layer index inside a tensor name ("model.layers.12.mlp...").
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Weight:
    """One tensor of an architecture (mergekit's ``WeightInfo``)."""

    name: str
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied_names: tuple[str, ...] = ()
    force_dtype: str | None = None
    vocabulary_axis: int | None = None


@dataclass(frozen=True)
class Architecture:
    """A single-module architecture: tensors before the layers, one layer's
    templates (``${layer_index}``), tensors after, and the layer-count key."""

    name: str
    pre: tuple[dict[str, Any], ...]
    layer: tuple[dict[str, Any], ...]
    post: tuple[dict[str, Any], ...]
    num_layers_key: str
    override_num_layers: int | None = None

    def num_layers(self, cfg: dict[str, Any]) -> int:
        if self.override_num_layers is not None:
            return self.override_num_layers
        node: Any = cfg
        for part in self.num_layers_key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise MergeError(f"model config has no '{self.num_layers_key}' (the layer count of a {self.name} model)")
            node = node[part]
        return int(node)

    def weights(self, templates: tuple[dict[str, Any], ...], num_layers: int, index: int | None = None) -> list[Weight]:
        return [_weight(t, num_layers, index) for t in templates]


class _Template(string.Template):
    idpattern = r"(?a:[_a-z][_a-z0-9]*([+-]1)?)"


def _substitute(text: str, num_layers: int, index: int | None) -> str:
    if "{" not in text:
        return text
    subs = {"num_layers": num_layers, "num_layers+1": num_layers + 1, "num_layers-1": num_layers - 1}
    if index is not None:
        subs.update({"layer_index": index, "layer_index+1": index + 1, "layer_index-1": index - 1})
    return _Template(text).substitute(subs)


def _weight(t: dict[str, Any], num_layers: int, index: int | None) -> Weight:
    def sub(s: str) -> str:
        return _substitute(s, num_layers, index)

    return Weight(
        name=sub(t["name"]),
        optional=bool(t.get("optional", False)),
        aliases=tuple(sub(a) for a in t.get("aliases") or ()),
        tied_names=tuple(sub(a) for a in t.get("tied_names") or ()),
        force_dtype=t.get("force_dtype"),
        vocabulary_axis=t.get("vocabulary_axis"),
    )


@lru_cache(maxsize=1)
def _architectures() -> dict[str, list[dict[str, Any]]]:
    """mergekit's architecture definitions by architecture class name."""
    import importlib.resources

    out: dict[str, list[dict[str, Any]]] = {}
    for f in importlib.resources.files("mergekit._data.architectures").iterdir():
        if f.is_file() and f.name.lower().endswith(".json"):
            data = json.loads(f.read_text())
            for name in data.get("architectures", []):
                out.setdefault(name, []).append(data)
    return out


def architecture(cfg: dict[str, Any]) -> tuple[Architecture | None, str | None]:
    """mergekit's definition of a model (by its ``config.json``), as mergekit
    picks it: (the architecture, None), or (None, why collab's engine cannot
    lay it out: a multi-module definition), or (None, None) when mergekit has
    none (it then infers one from the tensor names)."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        return None, None
    candidates = _architectures().get(archs[0], [])
    if len(candidates) > 1:
        candidates = [c for c in candidates if c.get("model_type") == cfg.get("model_type")][:1]
    if not candidates:
        return None, None
    data = candidates[0]
    if data.get("kind", "module") != "module":
        return None, f"{archs[0]} is a multi-module architecture in mergekit (modules: {', '.join(data.get('modules', {}))})"
    return (
        Architecture(
            name=archs[0],
            pre=tuple(data["pre_weights"]),
            layer=tuple(data["layer_templates"]["weights"]),
            post=tuple(data["post_weights"]),
            num_layers_key=data.get("num_layers_config_key") or "num_hidden_layers",
            override_num_layers=data.get("override_num_layers"),
        ),
        None,
    )


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its inputs ``(model ref, tensor name in that model)``
    in mergekit's order (``None`` where the model lacks an optional tensor),
    the base model's ref if it is an input, the parameters resolved for it
    (per-model ones as ``{ref: value}``), and how to cast it."""

    name: str
    inputs: tuple[tuple[str, str | None], ...]
    base: str | None
    params: dict[str, Any]
    load_dtype: str | None = None
    out_dtype: str | None = None
    optional: bool = False

    @property
    def label(self) -> str:
        """mergekit's scheduling key: the greatest input tensor name."""
        return max((n or "" for _, n in self.inputs), default="")


@dataclass
class Layout:
    """The output tensors of a merge (in execution order), the model whose
    ``config.json`` and tokenizer the output takes, and config updates (the
    layer count of a sliced merge)."""

    jobs: list[TensorJob]
    donor: str
    config_updates: dict[str, Any] = field(default_factory=dict)


def unsupported(plan: MergePlan) -> str | None:
    """Why collab's engine cannot run ``plan`` (mergekit's ``run_merge`` then
    does), or None when it can."""
    if plan.modules is not None:
        return "'modules:' configs"
    if plan.tokenizer_source is not None or plan.tokenizer is not None:
        return "tokenizer rules ('tokenizer_source' or 'tokenizer:'), which rebuild the vocabulary with transformers"
    if plan.chat_template is not None:
        return "'chat_template', which re-serialises the tokenizer with transformers"
    refs = plan.model_refs
    cfg = read_config(plan.inputs[refs[0]].path)
    arch, why = architecture(cfg)
    if why is not None:
        return why
    if arch is None and plan.slices:
        return f"slices of {(cfg.get('architectures') or ['an unknown'])[0]} models, for which mergekit has no architecture definition"
    return None


def _donor(plan: MergePlan) -> str:
    """mergekit's donor of the output config and tokenizer: the base model, else
    the first model the config names."""
    return plan.base_model or plan.model_refs[0]


class _Resolver:
    """mergekit's parameter resolution for one slice (``resolve_parameters``)."""

    def __init__(self, plan: MergePlan, sl: OutputSlice) -> None:
        self.plan = plan
        self.slice = sl
        self.base = sl.base_model or plan.base_model

    def _scopes(self, ref: str | None) -> list[dict[str, Setting]]:
        scopes = [s.parameters for s in self.slice.sources if s.ref == ref] if ref is not None else []
        return scopes + [self.slice.parameters, self.plan.parameters]

    def resolve(self, out_name: str, inputs: list[tuple[str, str]], t: float) -> dict[str, Any]:
        method = self.plan.method
        out: dict[str, Any] = {}
        for p in method.params:
            if p.scope == "shared":
                out[p.name] = self._value(p, self._scopes(None), out_name, t, None)
            else:
                out[p.name] = {
                    ref: self._value(p, self._scopes(ref), name, t, ref)
                    for ref, name in inputs
                    if ref != self.base or p.scope == "input"
                }
        return out

    def _value(self, p: Any, scopes: list[dict[str, Setting]], tensor: str, t: float, ref: str | None) -> Any:
        def check(value: Any) -> Any:
            try:
                return p.check(value)
            except ValueError as e:
                raise MergeError(f"parameter {p.name!r} for tensor '{tensor}': {e}") from None

        for scope in scopes:
            if p.name in scope:
                value = evaluate(scope[p.name], tensor, t, check)
                if value is not None:
                    return value
        if p.required:
            where = f"model '{ref}', tensor '{tensor}'" if ref is not None else f"tensor '{tensor}'"
            raise MergeError(f"parameter {p.name!r} of method '{self.plan.method.name}' is not set for {where}")
        return check(p.default)


def layout(plan: MergePlan, readers: dict[str, ModelReader]) -> Layout:
    """The tensor plan of ``plan`` (``unsupported(plan)`` is None) given a
    reader of every input model; MergeError, naming the config file, on a
    missing tensor or parameter or an input the method does not accept."""
    try:
        return _layout(plan, readers)
    except MergeError as e:
        raise MergeError(f"{plan.source_path or 'config'}: {e}") from None


def _layout(plan: MergePlan, readers: dict[str, ModelReader]) -> Layout:
    donor = _donor(plan)
    cfgs = {ref: read_config(plan.inputs[ref].path) for ref in readers}
    arch, _ = architecture(cfgs[donor])
    slices = plan.slices or (_models_slice(plan, arch, cfgs),)
    for i, sl in enumerate(slices):
        refs = [s.ref for s in sl.sources]
        twice = next((r for r in refs if refs.count(r) > 1), None)
        if twice is not None and not plan.method.whole_model:  # whole-model methods weigh models by position
            where = f"slices[{i}]: '{twice}' is a source twice" if plan.slices else f"models: '{twice}' is listed twice"
            raise MergeError(f"{where}; mergekit merges each model once per tensor (drop the duplicate, or give it a larger weight)")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            raise MergeError(f"slices[{i}]: every source must span the same number of layers, found {sorted(lengths)}")
    jobs: list[TensorJob] = []
    updates: dict[str, Any] = {}
    if arch is None:
        jobs = _by_file_names(plan, slices[0], readers)
    else:
        total = 0
        num_out = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in slices)
        first, last = _Resolver(plan, slices[0]), _Resolver(plan, slices[-1])
        for w in arch.weights(arch.pre, num_out):
            jobs += _job(plan, w, [(s.ref, w) for s in slices[0].sources], first, 0.0, readers)
        for sl in slices:
            res = _Resolver(plan, sl)
            n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for idx in range(n):
                t = idx / (n - 1) if n > 1 else 1.0
                outs = arch.weights(arch.layer, num_out, total)
                ins = [arch.weights(arch.layer, arch.num_layers(cfgs[s.ref]), s.layer_range[0] + idx) for s in sl.sources]
                for k, w in enumerate(outs):
                    jobs += _job(plan, w, [(s.ref, ins[j][k]) for j, s in enumerate(sl.sources)], res, t, readers)
                total += 1
        for w in arch.weights(arch.post, num_out):
            jobs += _job(plan, w, [(s.ref, w) for s in slices[-1].sources], last, 0.0, readers)
        if plan.slices:
            updates[arch.num_layers_key] = total
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise MergeError(f"tensor '{job.name}' would be written twice; check the slices' layer ranges")
        seen.add(job.name)
    return Layout(_execution_order(plan, jobs), donor, updates)


def _execution_order(plan: MergePlan, jobs: list[TensorJob]) -> list[TensorJob]:
    """The jobs in the order mergekit's executor runs them: sorted by label.
    Where two outputs share a label (slices that read the same layer twice)
    mergekit breaks the tie by its task graph; for its own methods (some draw
    random numbers) that order is taken from mergekit's planner and
    scheduler, which import transformers, so only then."""
    ordered = sorted(jobs, key=lambda j: j.label)
    labels = [j.label for j in ordered]
    if plan.method.source != "mergekit" or len(set(labels)) == len(labels):
        return ordered
    rank = {name: i for i, name in enumerate(_mergekit_schedule(plan))}
    missing = [j.name for j in jobs if j.name not in rank]
    if missing:
        raise MergeError(f"tensor '{missing[0]}' is not in mergekit's plan of this merge")
    return sorted(jobs, key=lambda j: rank[j.name])


def _mergekit_schedule(plan: MergePlan) -> list[str]:
    """Output tensor names in the order mergekit's ``Executor`` would merge them
    (planned by mergekit's own ``MergePlanner``; nothing is read or run)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = plan.mergekit_config()
    options = MergeOptions(quiet=True)
    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    planner = MergePlanner(config, arch, options=options, out_model_config=_model_out_config(config, arch))
    targets = planner.plan_to_disk(out_path="unused")
    tasks = (h.task() for h in Executor(targets).schedule.tasks)
    return [t.output_weight.name for t in tasks if isinstance(t, ExecuteMergeMethodTask)]


def _models_slice(plan: MergePlan, arch: Architecture | None, cfgs: dict[str, dict[str, Any]]) -> OutputSlice:
    """``models:`` as mergekit normalises them: one slice over every layer, the
    base model appended when not listed."""
    refs = [(m.ref, m.parameters) for m in plan.models]
    if plan.base_model is not None and plan.base_model not in [r for r, _ in refs] and not plan.method.whole_model:
        refs.append((plan.base_model, {}))
    sources = []
    for ref, params in refs:
        n = arch.num_layers(cfgs[ref]) if arch is not None else 1
        sources.append(SliceSource(ref, (0, n), params))
    return OutputSlice(tuple(sources))


def _job(
    plan: MergePlan, out: Weight, ins: list[tuple[str, Weight]], res: _Resolver, t: float, readers: dict[str, ModelReader]
) -> list[TensorJob]:
    """The job of one output tensor (none for an optional tensor no input has)."""
    if out.optional and not any(readers[ref].has(n) for ref, w in ins for n in (w.name, *w.aliases)):
        return []
    inputs: list[tuple[str, str | None]] = []
    for ref, w in ins:
        name = next((n for n in (w.name, *w.aliases, *w.tied_names) if readers[ref].has(n)), None)
        if name is None and not w.optional:
            raise MergeError(f"model '{ref}' has no tensor '{w.name}' (needed for output tensor '{out.name}')")
        inputs.append((ref, name))
    refs = [r for r, _ in inputs]
    base = res.base if plan.method.base != "ignored" else None
    if base is not None and base not in refs:
        raise MergeError(f"tensor '{out.name}': the base model '{base}' is not among the slice's sources")
    plan.method.check_inputs(refs, base, f"tensor '{out.name}'")
    params = res.resolve(out.name, [(r, w.name) for r, w in ins], t)
    w_in = next((w for _, w in ins), out)
    return [
        TensorJob(
            name=out.name,
            inputs=tuple(inputs),
            base=base,
            params=params,
            load_dtype=w_in.force_dtype or plan.dtype,
            out_dtype=out.force_dtype or plan.out_dtype,
            optional=out.optional,
        )
    ]


def _by_file_names(plan: MergePlan, sl: OutputSlice, readers: dict[str, ModelReader]) -> list[TensorJob]:
    """Jobs for a ``models:`` merge of an architecture mergekit has no
    definition of: every tensor the donor stores, ``t`` from its layer index."""
    names = readers[_donor(plan)].names()
    layers = [int(m.group(1)) for n in names if (m := _LAYER_RE.search(n))]
    n_layers = max(layers) + 1 if layers else 1
    res = _Resolver(plan, sl)
    jobs = []
    for name in names:
        m = _LAYER_RE.search(name)
        t = 0.0 if m is None else (int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0)
        jobs += _job(plan, Weight(name), [(s.ref, Weight(name)) for s in sl.sources], res, t, readers)
    return jobs


def model_dirs(plan: MergePlan) -> dict[str, Path]:
    """The local directory of every model whose tensors are merged."""
    refs = [m.ref for m in plan.models] + [s.ref for sl in plan.slices for s in sl.sources]
    if plan.base_model is not None:
        refs.append(plan.base_model)
    refs += [sl.base_model for sl in plan.slices if sl.base_model]
    return {r: plan.inputs[r].path for r in dict.fromkeys(refs)}
