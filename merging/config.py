"""Read a merge config (mergekit's YAML plus collab's additions) into a typed
``MergePlan`` and check it against the input models before anything is written.

collab adds to mergekit's schema: model references mergekit cannot read
(``zoo:NAME``, ``.gguf``, LoRA adapter directories), the methods of
``merging.registry``, and a top-level ``search:`` block (``merging.search``).
The plan carries the method's registry entry, the models or slices with their
parameters parsed into typed settings (``merging.settings``) and checked
against the method's declared parameters, and the normalised dtypes; the
engine and the search read those fields, never the YAML.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from merging.errors import MergeError
from merging.inputs import InputResolver, ResolvedInput, layer_pattern, tensor_shapes
from merging.methods import MethodInfo
from merging.registry import get_method
from merging.settings import Setting, leaves, parse, to_yaml
from merging.tensorio import read_config

#: Top-level keys collab reads itself and removes before mergekit sees the config.
COLLAB_KEYS = ("search",)
#: Top-level keys of mergekit's multi-document configs that a single merge ignores.
_IGNORED_KEYS = ("name",)
#: The dtype names mergekit reads (``mergekit.common.dtype_from_name``), each
#: also with a ``torch.`` prefix.
DTYPES = ("float32", "bfloat16", "float16", "float64", "int64")
_TOKENIZER_WORDS = ("union", "base")


@dataclass(frozen=True)
class ModelEntry:
    """One entry of ``models:``: a reference as the config writes it and its parameters."""

    ref: str
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """One source of an output slice: layers ``layer_range[0]`` to ``layer_range[1] - 1`` of ``ref``."""

    ref: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """One entry of ``slices:``: layers merged from its sources, in order."""

    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    residual_weight: float | None = None


@dataclass
class MergePlan:
    """A validated merge: the method, the typed config and the local directory
    of every model it names. ``tokenizer`` and ``modules`` are kept as written:
    only mergekit's own pipeline reads them (see ``merging.mergekit_run``)."""

    source_text: str
    source_path: Path | None
    method: MethodInfo
    inputs: dict[str, ResolvedInput]
    models: tuple[ModelEntry, ...] = ()
    slices: tuple[OutputSlice, ...] = ()
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    modules: dict[str, Any] | None = None
    name: str | None = None
    search: dict[str, Any] | None = None
    model_refs: list[str] = field(default_factory=list)

    @property
    def base_ref(self) -> str | None:
        return self.base_model

    @property
    def config_dir(self) -> Path | None:
        return self.source_path.parent if self.source_path else None

    def to_config(self, *, paths: bool = False) -> dict[str, Any]:
        """The mergekit YAML this plan reads back as (``search`` excluded), with
        model references as written or, with ``paths``, as local directories."""
        cfg: dict[str, Any] = {}
        if self.models:
            cfg["models"] = [{"model": m.ref, **_params_yaml(m.parameters)} for m in self.models]
        if self.slices:
            cfg["slices"] = [
                {
                    "sources": [{"model": s.ref, "layer_range": list(s.layer_range), **_params_yaml(s.parameters)} for s in sl.sources],
                    **({"base_model": sl.base_model} if sl.base_model else {}),
                    **_params_yaml(sl.parameters),
                    **({"residual_weight": sl.residual_weight} if sl.residual_weight is not None else {}),
                }
                for sl in self.slices
            ]
        if self.modules is not None:
            cfg["modules"] = copy.deepcopy(self.modules)
        cfg["merge_method"] = self.method.name
        for key in ("base_model", "dtype", "out_dtype", "tokenizer_source", "chat_template", "name"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        if self.tokenizer is not None:
            cfg["tokenizer"] = copy.deepcopy(self.tokenizer)
        cfg.update(_params_yaml(self.parameters))
        if paths:
            for _slot, container, key in _ref_slots(cfg):
                container[key] = str(self.inputs[_ref_str(container[key])].path)
        return cfg

    def mergekit_config(self) -> Any:
        """A fresh mergekit configuration (``run_merge`` mutates the one it gets)."""
        cfg = self.to_config(paths=True)
        cfg.pop("name", None)
        return stable_configuration_class().model_validate(cfg)

    def with_models(self, models: tuple[ModelEntry, ...], source_text: str) -> MergePlan:
        """The same merge with other ``models:`` entries (the search's weights)."""
        return replace(self, models=models, source_text=source_text, search=None)

    def shared_values(self) -> dict[str, Any]:
        """The method's shared parameters as scalars, defaults filled in, for
        whole-model methods (their settings are scalars: see ``_check_whole_model``)."""
        out: dict[str, Any] = {}
        for p in self.method.params:
            if p.per_model:
                continue
            if p.name in self.parameters:
                out[p.name] = p.check(self.parameters[p.name])
            elif not p.required:
                out[p.name] = p.default
        return out

    def model_values(self, name: str) -> list[Any]:
        """Per-model parameter ``name`` of each ``models:`` entry as a scalar (its
        own setting, else the top-level one, else the default)."""
        p = self.method.param(name)
        assert p is not None, name
        out = []
        for m in self.models:
            setting = m.parameters.get(name, self.parameters.get(name, p.default))
            out.append(p.check(setting))
        return out


def _params_yaml(params: dict[str, Setting]) -> dict[str, Any]:
    return {"parameters": {k: to_yaml(v) for k, v in params.items()}} if params else {}


def stable_configuration_class() -> type:
    """mergekit's MergeConfiguration whose ``referenced_models()`` keeps the order
    in which the config names them. mergekit returns ``list(set(...))``, whose
    order follows string hashes (random per process), and picks the output
    config and tokenizer donor from its first element when there is no base."""
    global _STABLE
    if _STABLE is None:
        from mergekit.config import MergeConfiguration

        class StableMergeConfiguration(MergeConfiguration):
            def referenced_models(self) -> list[Any]:
                seen: dict[Any, None] = {}
                if self.base_model:
                    seen[self.base_model] = None
                for m in self.models or []:
                    seen[m.model] = None
                for s in self.slices or []:
                    for src in s.sources:
                        seen[src.model] = None
                for mod in (self.modules or {}).values():
                    for m in mod.models or []:
                        seen[m.model] = None
                    for s in mod.slices or []:
                        for src in s.sources:
                            seen[src.model] = None
                return list(seen)

        _STABLE = StableMergeConfiguration
    return _STABLE


_STABLE: type | None = None


def _ref_str(value: Any, where: str = "model") -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("model"), str):
        return value["model"] + (f"+{value['lora']}" if value.get("lora") else "")
    raise MergeError(f"{where}: expected a model reference (a string), found {value!r}")


def _ref_slots(cfg: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any] | list[Any], Any]]:
    """Every place in a config that holds a model reference: (where, container, key)."""
    if cfg.get("base_model") is not None:
        yield "base_model", cfg, "base_model"
    for i, m in enumerate(cfg.get("models") or []):
        if isinstance(m, dict) and "model" in m:
            yield f"models[{i}].model", m, "model"
    for i, s in enumerate(cfg.get("slices") or []):
        if isinstance(s, dict):
            if s.get("base_model") is not None:
                yield f"slices[{i}].base_model", s, "base_model"
            for j, src in enumerate(s.get("sources") or []):
                if isinstance(src, dict) and "model" in src:
                    yield f"slices[{i}].sources[{j}].model", src, "model"
    for name, mod in (cfg.get("modules") or {}).items():
        if isinstance(mod, dict):
            yield from ((f"modules.{name}.{w}", c, k) for w, c, k in _ref_slots({k2: mod.get(k2) for k2 in ("models", "slices")}))
    ts = cfg.get("tokenizer_source")
    if isinstance(ts, str) and ts not in _TOKENIZER_WORDS:
        yield "tokenizer_source", cfg, "tokenizer_source"
    tok = cfg.get("tokenizer")
    if isinstance(tok, dict):
        if isinstance(tok.get("source"), str) and tok["source"] not in _TOKENIZER_WORDS:
            yield "tokenizer.source", tok, "source"
        for tname, t in (tok.get("tokens") or {}).items():
            src = t.get("source") if isinstance(t, dict) else None
            if isinstance(src, str):
                yield f"tokenizer.tokens.{tname}.source", t, "source"
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                yield f"tokenizer.tokens.{tname}.source.model", src, "model"


def load_config(config: str | os.PathLike[str] | dict[str, Any]) -> tuple[dict[str, Any], str, Path | None]:
    """The config as a dict, its source text and its file (None for a dict)."""
    if isinstance(config, dict):
        return copy.deepcopy(config), yaml.safe_dump(config, sort_keys=False), None
    path = Path(config)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(f"{path}: merge config not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a mapping with 'merge_method' and 'models' or 'slices', found {type(data).__name__}")
    return data, text, path


def plan_merge(
    config: str | os.PathLike[str] | dict[str, Any],
    resolver_factory: Callable[[Path | None], InputResolver],
) -> MergePlan:
    """Parse, resolve every model reference and validate; raise MergeError naming
    the file, field, model, tensor and shapes on the first problem found."""
    raw, text, path = load_config(config)
    where = str(path) if path else "config"
    _validate_keys(raw, where)
    if "merge_method" not in raw:
        raise MergeError(f"{where}: field 'merge_method' is missing")
    try:
        method = get_method(str(raw["merge_method"]))
    except MergeError as e:
        raise MergeError(f"{where}: {e}") from None
    search = raw.pop("search", None)
    if search is not None and not isinstance(search, dict):
        raise MergeError(f"{where}: 'search' must be a mapping (method, eval, ...), found {search!r}")
    resolver = resolver_factory(path)
    refs: list[str] = []
    for slot, container, key in _ref_slots(raw):
        ref = _ref_str(container[key], f"{where}: {slot}")
        container[key] = ref
        resolver(ref, f"{where}: {slot}")
        if ref not in refs:
            refs.append(ref)
    plan = _typed_plan(raw, text, path, method, dict(resolver.resolved), search, refs, where)
    _validate_parameters(plan, where)
    _validate_models(plan, where)
    return plan


def _mapping(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MergeError(f"{where}: expected {what}, found {value!r}")
    return value


def _keys(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for k in value:
        if k not in allowed:
            raise MergeError(f"{where}: unknown key {k!r}; expected one of {', '.join(allowed)}")


def _parameters(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    params = _mapping(value, where, "a mapping of parameter names to values")
    return {str(k): parse(v, f"{where}.{k}") for k, v in params.items()}


def _dtype(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        raise MergeError(f"{where}: {key}: expected one of {', '.join(DTYPES)} (optionally prefixed 'torch.'), found {value!r}")
    return name


def _typed_plan(
    raw: dict[str, Any],
    text: str,
    path: Path | None,
    method: MethodInfo,
    inputs: dict[str, ResolvedInput],
    search: dict[str, Any] | None,
    refs: list[str],
    where: str,
) -> MergePlan:
    given = [k for k in ("models", "slices", "modules") if raw.get(k)]
    if len(given) != 1:
        raise MergeError(f"{where}: give exactly one of 'models', 'slices' or 'modules', found {given or 'none'}")
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise MergeError(f"{where}: give 'tokenizer_source' or a 'tokenizer:' block, not both")
    models: list[ModelEntry] = []
    for i, m in enumerate(raw.get("models") or []):
        loc = f"{where}: models[{i}]"
        _keys(_mapping(m, loc, "a mapping with 'model' and optional 'parameters'"), ("model", "parameters"), loc)
        if "model" not in m:
            raise MergeError(f"{loc}: field 'model' is missing")
        models.append(ModelEntry(m["model"], _parameters(m.get("parameters"), f"{loc}.parameters")))
    slices: list[OutputSlice] = []
    for i, s in enumerate(raw.get("slices") or []):
        loc = f"{where}: slices[{i}]"
        _keys(_mapping(s, loc, "a mapping with 'sources'"), ("sources", "base_model", "parameters", "residual_weight"), loc)
        if not isinstance(s.get("sources"), list) or not s["sources"]:
            raise MergeError(f"{loc}.sources: expected a non-empty list of sources, found {s.get('sources')!r}")
        sources = []
        for j, src in enumerate(s["sources"]):
            sloc = f"{loc}.sources[{j}]"
            _keys(_mapping(src, sloc, "a mapping with 'model' and 'layer_range'"), ("model", "layer_range", "parameters"), sloc)
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr) and 0 <= lr[0] < lr[1]):
                raise MergeError(f"{sloc}.layer_range: expected [first, end] with 0 <= first < end, found {lr!r}")
            if "model" not in src:
                raise MergeError(f"{sloc}: field 'model' is missing")
            sources.append(SliceSource(src["model"], (lr[0], lr[1]), _parameters(src.get("parameters"), f"{sloc}.parameters")))
        rw = s.get("residual_weight")
        if rw is not None and (isinstance(rw, bool) or not isinstance(rw, (int, float))):
            raise MergeError(f"{loc}.residual_weight: expected a number, found {rw!r}")
        slices.append(OutputSlice(tuple(sources), s.get("base_model"), _parameters(s.get("parameters"), f"{loc}.parameters"), rw))
    modules = raw.get("modules")
    if modules is not None:
        _mapping(modules, f"{where}: modules", "a mapping of module names to models or slices")
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None:
        _mapping(tokenizer, f"{where}: tokenizer", "a mapping (source, tokens, pad_to_multiple_of)")
    ts = raw.get("tokenizer_source")
    if ts is not None and not isinstance(ts, str):
        raise MergeError(f"{where}: tokenizer_source: expected 'union', 'base' or a model, found {ts!r}")
    ct = raw.get("chat_template")
    if ct is not None and not isinstance(ct, str):
        raise MergeError(f"{where}: chat_template: expected a template name or a Jinja template, found {ct!r}")
    plan = MergePlan(
        source_text=text,
        source_path=path,
        method=method,
        inputs=inputs,
        models=tuple(models),
        slices=tuple(slices),
        base_model=raw.get("base_model"),
        parameters=_parameters(raw.get("parameters"), f"{where}: parameters"),
        dtype=_dtype(raw, "dtype", where),
        out_dtype=_dtype(raw, "out_dtype", where),
        tokenizer_source=ts,
        tokenizer=copy.deepcopy(tokenizer),
        chat_template=ct,
        modules=copy.deepcopy(modules),
        name=raw.get("name"),
        search=search,
        model_refs=refs,
    )
    if modules is not None or tokenizer is not None:
        _validate_mergekit_schema(plan, where)  # blocks only mergekit's pipeline reads
    if method.whole_model and not plan.models:
        raise MergeError(f"{where}: method '{method.name}' merges whole models; give 'models:' (slices and modules are not supported)")
    return plan


def _validate_mergekit_schema(plan: MergePlan, where: str) -> None:
    from pydantic import ValidationError

    try:
        plan.mergekit_config()
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise MergeError(f"{where}: {loc}: {first['msg']} (found {first.get('input')!r})") from None
    except (RuntimeError, ValueError) as e:
        raise MergeError(f"{where}: {e}") from None


def allowed_keys() -> tuple[str, ...]:
    """The top-level keys a merge config may have: mergekit's ``MergeConfiguration``
    fields, collab's own (``search``) and keys a single merge ignores (``name``)."""
    return _MERGEKIT_KEYS + COLLAB_KEYS + _IGNORED_KEYS


#: ``mergekit.config.MergeConfiguration``'s fields (pinned by tests/merging/test_validation.py).
_MERGEKIT_KEYS = (
    "modules", "slices", "models", "merge_method", "base_model", "dtype",
    "tokenizer_source", "tokenizer", "chat_template", "out_dtype", "parameters",
)


def _validate_keys(raw: dict[str, Any], where: str) -> None:
    """Unknown top-level keys: mergekit's schema ignores them, so a typo would
    silently change the merge."""
    allowed = allowed_keys()
    for key in raw:
        if key not in allowed:
            raise MergeError(f"{where}: unknown top-level key {key!r}; expected one of {', '.join(allowed)}")


def _param_scopes(plan: MergePlan) -> Iterator[tuple[str, dict[str, Setting], bool]]:
    """(where, parameters, whether the scope is one model's)."""
    yield "parameters", plan.parameters, False
    for i, m in enumerate(plan.models):
        yield f"models[{i}].parameters", m.parameters, True
    for i, s in enumerate(plan.slices):
        yield f"slices[{i}].parameters", s.parameters, False
        for j, src in enumerate(s.sources):
            yield f"slices[{i}].sources[{j}].parameters", src.parameters, True
    for name, mod in (plan.modules or {}).items():
        if isinstance(mod, dict) and mod.get("parameters") is not None:
            yield f"modules.{name}.parameters", _parameters(mod["parameters"], f"modules.{name}.parameters"), False


def _validate_parameters(plan: MergePlan, where: str) -> None:
    m = plan.method
    names = [p.name for p in m.params]
    given_shared: set[str] = set()
    for loc, params, per_model in _param_scopes(plan):
        for k, setting in params.items():
            p = m.param(k)
            if p is None:
                raise MergeError(
                    f"{where}: {loc}: unknown parameter {k!r} for method '{m.name}'; expected one of {', '.join(names) or '(none)'}"
                )
            if per_model and not p.per_model:
                raise MergeError(f"{where}: {loc}: parameter {k!r} of '{m.name}' applies to the whole merge; set it under the top-level 'parameters'")
            if m.whole_model and not isinstance(setting, (bool, int, float, str)):
                raise MergeError(f"{where}: {loc}.{k}: method '{m.name}' takes one value, found {to_yaml(setting)!r} (gradients and filters are for tensor-wise methods)")
            for value in leaves(setting):
                try:
                    p.check(value)
                except ValueError as e:
                    raise MergeError(f"{where}: {loc}.{k}: {e}") from None
        if not per_model:
            given_shared |= set(params)
    base = plan.base_ref
    if m.base == "required" and base is None and not any(s.base_model for s in plan.slices):
        raise MergeError(f"{where}: method '{m.name}' needs a base model; add 'base_model: <the model the others were fine-tuned from>'")
    for p in m.params:
        if not p.required or p.name in given_shared:
            continue
        for i, mod in enumerate(plan.models):
            if p.scope == "non_base" and mod.ref == base:
                continue
            if p.name not in mod.parameters:
                raise MergeError(f"{where}: models[{i}] ({mod.ref}): parameter {p.name!r} is required by method '{m.name}' and not set")
        if not p.per_model and plan.models:
            raise MergeError(f"{where}: parameters: {p.name!r} is required by method '{m.name}' and not set")


def _input_models(plan: MergePlan) -> list[str]:
    """References whose weights are merged (tokenizer-only donors excluded)."""
    out: list[str] = []
    for slot, container, key in _ref_slots(plan.to_config()):
        if slot.startswith("tokenizer"):
            continue
        ref = _ref_str(container[key])
        if ref not in out:
            out.append(ref)
    return out


def _tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    f = model_dir / "tokenizer.json"
    if not f.exists():
        return None
    try:
        tok = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    vocab = dict(tok.get("model", {}).get("vocab") or {})
    if isinstance(tok.get("model", {}).get("vocab"), list):  # unigram: [[piece, score], ...]
        vocab = {p[0]: i for i, p in enumerate(tok["model"]["vocab"])}
    for a in tok.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
    return vocab


def _same_file(a: Path, b: Path) -> bool:
    """Both missing, or both present with the same bytes."""
    import filecmp

    if not a.exists() or not b.exists():
        return a.exists() == b.exists()
    return filecmp.cmp(a, b, shallow=False)


def _validate_models(plan: MergePlan, where: str) -> None:
    refs = _input_models(plan)
    if not refs:
        raise MergeError(f"{where}: no input models")
    has_tok_rule = plan.tokenizer_source is not None or plan.tokenizer is not None
    by_layer = bool(plan.slices or plan.modules)
    first = refs[0] if plan.base_ref is None else plan.base_ref
    ref_dir = plan.inputs[first].path
    ref_cfg = read_config(ref_dir)
    ref_shapes = _shape_table(tensor_shapes(ref_dir), by_layer)
    check_vocab = not has_tok_rule
    ref_vocab: dict[str, int] | None = None
    vocab_size = ref_cfg.get("vocab_size") or (ref_cfg.get("text_config") or {}).get("vocab_size")
    for ref in refs:
        if ref == first:
            continue
        d = plan.inputs[ref].path
        cfg = read_config(d)
        if cfg.get("architectures") != ref_cfg.get("architectures") or cfg.get("model_type") != ref_cfg.get("model_type"):
            raise MergeError(
                f"{where}: model '{ref}' is a {cfg.get('model_type')} {cfg.get('architectures')}, but '{first}' is a "
                f"{ref_cfg.get('model_type')} {ref_cfg.get('architectures')}; models of different architectures cannot be merged"
            )
        shapes = _shape_table(tensor_shapes(d), by_layer)
        if not by_layer:
            # Every engine takes the tensor names from one model; a tensor only the
            # others have would be dropped without a word (e.g. a third layer).
            _check_same_names(ref_shapes, shapes, first, ref, _layer_note(ref_cfg, cfg, first, ref), where)
        for name, shape in ref_shapes.items():
            other = shapes.get(name)
            if other is None:
                continue  # slices and modules pick layers: only shared names must agree
            if other == shape:
                continue
            is_vocab = len(shape) == len(other) and shape[1:] == other[1:] and vocab_size in (shape[0], None) and other[0] != shape[0]
            if is_vocab and has_tok_rule:
                continue
            hint = (
                "; the vocabularies differ: add 'tokenizer_source: base' or 'tokenizer_source: union' (or a 'tokenizer:' block)"
                if is_vocab
                else ""
            )
            raise MergeError(
                f"{where}: tensor '{name}' has shape {list(other)} in '{ref}' but {list(shape)} in '{first}'{hint}"
            )
        if check_vocab and not _same_file(ref_dir / "tokenizer.json", d / "tokenizer.json"):
            # Parse the vocabularies only when the tokenizer files differ (fine-tunes
            # usually carry a byte-identical copy of their base's tokenizer).
            if ref_vocab is None:
                ref_vocab = _tokenizer_vocab(ref_dir)
            vocab = _tokenizer_vocab(d)
            if vocab is not None and ref_vocab is not None and vocab != ref_vocab:
                diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()))[:3]
                raise MergeError(
                    f"{where}: the tokenizers of '{ref}' and '{first}' differ ({len(vocab)} vs {len(ref_vocab)} tokens; "
                    f"e.g. {diff}); add 'tokenizer_source: base' or 'tokenizer_source: union' so the embeddings are aligned"
                )


def _check_same_names(
    ref_shapes: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], first: str, ref: str, note: str, where: str
) -> None:
    """MergeError naming the first tensor that one of the two models lacks."""
    for name, shape in ref_shapes.items():
        if name not in shapes:
            raise MergeError(f"{where}: model '{ref}' has no tensor '{name}' (present in '{first}' with shape {list(shape)}){note}")
    for name, shape in shapes.items():
        if name not in ref_shapes:
            raise MergeError(f"{where}: model '{first}' has no tensor '{name}' (present in '{ref}' with shape {list(shape)}){note}")


def _layer_note(ref_cfg: dict[str, Any], cfg: dict[str, Any], first: str, ref: str) -> str:
    def layers(c: dict[str, Any]) -> Any:
        return c.get("num_hidden_layers", (c.get("text_config") or {}).get("num_hidden_layers"))

    a, b = layers(ref_cfg), layers(cfg)
    if a is None or b is None or a == b:
        return ""
    return f"; '{first}' has {a} layers and '{ref}' has {b} (use 'slices:' to merge chosen layer ranges)"


def _shape_table(shapes: dict[str, tuple[int, ...]], by_layer: bool) -> dict[str, tuple[int, ...]]:
    if not by_layer:
        return shapes
    return {layer_pattern(k): v for k, v in shapes.items()}
