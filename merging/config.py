"""Read a merge config (mergekit's YAML plus collab's additions) and check it
against the input models before anything is written.

collab adds to mergekit's schema: model references mergekit cannot read
(``zoo:NAME``, ``.gguf``, LoRA adapter directories), the methods of
``merging.methods``, and a top-level ``search:`` block (``merging.search``).
Everything else is passed to mergekit unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from merging.errors import MergeError
from merging.inputs import InputResolver, ResolvedInput, layer_pattern, read_config, tensor_shapes
from merging.methods import MethodInfo, get_method

#: Top-level keys collab reads itself and removes before mergekit sees the config.
COLLAB_KEYS = ("search",)
#: Top-level keys of mergekit's multi-document configs that a single merge ignores.
_IGNORED_KEYS = ("name",)
#: Output dtypes mergekit (``dtype_from_name``) and collab's engines both accept.
DTYPES = ("float32", "bfloat16", "float16", "float64")
_TOKENIZER_WORDS = ("union", "base")


@dataclass
class MergePlan:
    """A validated merge: the config with local paths and what it refers to."""

    source_text: str
    source_path: Path | None
    raw: dict[str, Any]
    resolved: dict[str, Any]
    method: MethodInfo
    inputs: dict[str, ResolvedInput]
    search: dict[str, Any] | None = None
    model_refs: list[str] = field(default_factory=list)

    def mergekit_config(self) -> Any:
        """A fresh mergekit configuration (``run_merge`` mutates the one it gets)."""
        return stable_configuration_class().model_validate(copy.deepcopy(self.resolved))

    @property
    def base_ref(self) -> str | None:
        b = self.raw.get("base_model")
        return _ref_str(b) if b is not None else None


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


def _ref_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("model"), str):
        return value["model"] + (f"+{value['lora']}" if value.get("lora") else "")
    raise MergeError(f"expected a model reference (a string), found {value!r}")


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
    the field, model, tensor and shapes on the first problem found."""
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
    resolved = copy.deepcopy(raw)
    refs: list[str] = []
    for slot, container, key in _ref_slots(resolved):
        ref = _ref_str(container[key])
        inp = resolver(ref, f"{where}: {slot}")
        container[key] = str(inp.path)
        if ref not in refs:
            refs.append(ref)
    plan = MergePlan(text, path, raw, resolved, method, dict(resolver.resolved), search, refs)
    _validate_schema(plan, where)
    _validate_parameters(plan, where)
    _validate_models(plan, where)
    return plan


def allowed_keys() -> tuple[str, ...]:
    """The top-level keys a merge config may have: mergekit's ``MergeConfiguration``
    fields, collab's own (``search``) and keys a single merge ignores (``name``)."""
    from mergekit.config import MergeConfiguration

    return tuple(MergeConfiguration.model_fields) + COLLAB_KEYS + _IGNORED_KEYS


def _validate_keys(raw: dict[str, Any], where: str) -> None:
    """Unknown top-level keys (mergekit's schema ignores them, so a typo would
    silently change the merge) and bad ``dtype``/``out_dtype`` values."""
    allowed = allowed_keys()
    for key in raw:
        if key not in allowed:
            raise MergeError(f"{where}: unknown top-level key {key!r}; expected one of {', '.join(allowed)}")
    for key in ("dtype", "out_dtype"):
        value = raw.get(key)
        if value is not None and value not in DTYPES:
            raise MergeError(f"{where}: {key}: expected one of {', '.join(DTYPES)}, found {value!r}")


def _validate_schema(plan: MergePlan, where: str) -> None:
    from merging import lean

    if lean.supports(plan):
        return  # a plain models/base_model/scalars config: checked below, mergekit not needed
    from pydantic import ValidationError

    try:
        plan.mergekit_config()
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise MergeError(f"{where}: {loc}: {first['msg']} (found {first.get('input')!r})") from None
    except (RuntimeError, ValueError) as e:
        raise MergeError(f"{where}: {e}") from None
    if plan.method.engine == "collab" and not plan.raw.get("models"):
        raise MergeError(f"{where}: method '{plan.method.name}' merges whole models; give 'models:' (slices and modules are not supported)")


def _param_scopes(raw: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(where, parameters, model ref or None for shared scopes)."""
    if raw.get("parameters") is not None:
        yield "parameters", raw["parameters"], None
    for i, m in enumerate(raw.get("models") or []):
        if m.get("parameters") is not None:
            yield f"models[{i}].parameters", m["parameters"], _ref_str(m["model"])
    for i, s in enumerate(raw.get("slices") or []):
        if s.get("parameters") is not None:
            yield f"slices[{i}].parameters", s["parameters"], None
        for j, src in enumerate(s.get("sources") or []):
            if src.get("parameters") is not None:
                yield f"slices[{i}].sources[{j}].parameters", src["parameters"], _ref_str(src["model"])
    for name, mod in (raw.get("modules") or {}).items():
        if mod.get("parameters") is not None:
            yield f"modules.{name}.parameters", mod["parameters"], None


def _validate_parameters(plan: MergePlan, where: str) -> None:
    m = plan.method
    names = [p.name for p in m.params]
    given_shared: set[str] = set()
    for loc, params, model in _param_scopes(plan.raw):
        if not isinstance(params, dict):
            raise MergeError(f"{where}: {loc}: expected a mapping of parameter names to values, found {params!r}")
        for k in params:
            p = m.param(k)
            if p is None:
                raise MergeError(
                    f"{where}: {loc}: unknown parameter {k!r} for method '{m.name}'; expected one of {', '.join(names) or '(none)'}"
                )
            if model is not None and not p.per_model:
                raise MergeError(f"{where}: {loc}: parameter {k!r} of '{m.name}' applies to the whole merge; set it under the top-level 'parameters'")
        if model is None:
            given_shared |= set(params)
    base = plan.base_ref
    if m.base == "required" and base is None and not any(s.get("base_model") for s in plan.raw.get("slices") or []):
        raise MergeError(f"{where}: method '{m.name}' needs a base model; add 'base_model: <the model the others were fine-tuned from>'")
    for p in m.params:
        if not p.required or p.name in given_shared:
            continue
        for i, mod in enumerate(plan.raw.get("models") or []):
            ref = _ref_str(mod["model"])
            if p.per_model and ref == base and m.base != "ignored":
                continue
            if p.name not in (mod.get("parameters") or {}):
                raise MergeError(f"{where}: models[{i}] ({ref}): parameter {p.name!r} is required by method '{m.name}' and not set")


def _input_models(plan: MergePlan) -> list[str]:
    """References whose weights are merged (tokenizer-only donors excluded)."""
    out: list[str] = []
    for slot, container, key in _ref_slots(plan.raw):
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
    has_tok_rule = plan.raw.get("tokenizer_source") is not None or plan.raw.get("tokenizer") is not None
    by_layer = bool(plan.raw.get("slices") or plan.raw.get("modules"))
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
