"""Spec files: one YAML that names experts and the systems built from them.

```yaml
experts:
  smol:  {ref: zoo:smollm2-135m-instruct}
  far:   {url: http://127.0.0.1:8001/v1, model: some-model}
systems:
  auto:  {type: route, router: artefacts/router-knn, experts: [smol, far]}
```

Every expert is also a system under its own name. System types live in a
registry that the method packages fill: through the ``collab.system_types``
entry-point group (so ``import collab`` never imports them) or at run time with
``register_system_type``. Paths in a spec are relative to the spec file.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from collab.errors import SpecError

_REMOTE_OPTIONS = ("timeout", "retries", "backoff", "breaker_failures", "breaker_cooldown")
_EXPERT_KEYS = {"ref", "url", "model", "api_key", "dtype", "device", "prompt_format", "allow_pickle", "fallback", "batch_size", *_REMOTE_OPTIONS}


class SystemType(Protocol):
    """What a registered system type provides: a validator and a builder."""

    def validate(self, spec: "Spec", name: str, config: dict[str, Any]) -> None: ...

    def build(self, spec: "Spec", name: str, config: dict[str, Any]) -> Any: ...


_REGISTRY: dict[str, SystemType] = {}


def register_system_type(key: str, system_type: SystemType) -> None:
    """Register a system type under the lowercase key used in ``type:``."""
    if key != key.lower():
        raise ValueError(f"system type key must be lowercase, found {key!r}")
    _REGISTRY[key] = system_type


def system_types() -> dict[str, Callable[[], SystemType]]:
    """Known system types by key, each a loader that imports its package on demand."""
    found: dict[str, Callable[[], SystemType]] = {}
    for ep in importlib.metadata.entry_points(group="collab.system_types"):
        found[ep.name] = lambda ep=ep: ep.load()()
    for key, st in _REGISTRY.items():
        found[key] = lambda st=st: st
    return found


@dataclass
class ExpertSpec:
    """One entry of ``experts:``: a local model (``ref``) or a remote endpoint (``url`` + ``model``)."""

    name: str
    ref: str | None = None
    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.url is not None


class Spec:
    """A parsed, validated spec file. ``spec.system(name)`` builds (once) and returns a System."""

    def __init__(self, data: dict[str, Any], path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.root = self.path.parent if self.path is not None else Path.cwd()
        self.experts: dict[str, ExpertSpec] = {}
        self.systems: dict[str, dict[str, Any]] = {}
        self._built: dict[str, Any] = {}
        self._parse(data)

    # ------------------------------------------------------------ validation
    def error(self, key_path: str, message: str) -> SpecError:
        where = str(self.path) if self.path is not None else "<spec>"
        return SpecError(f"{where}: {key_path}: {message}")

    def resolve_path(self, value: str) -> Path:
        p = Path(os.path.expandvars(str(value))).expanduser()
        return p if p.is_absolute() else self.root / p

    def reject_unknown_keys(self, config: dict[str, Any], key_path: str, kind: str, keys: Any) -> None:
        """SpecError naming the first key of ``config`` (alphabetically) that is not in ``keys``."""
        unknown = set(config) - set(keys)
        if unknown:
            raise self.error(f"{key_path}.{min(unknown)}", f"unknown key for type '{kind}'; expected some of {', '.join(sorted(keys))}")

    def require_dir(self, config: dict[str, Any], key: str, key_path: str) -> Path:
        """The directory named by ``config[key]``, relative to the spec; SpecError if absent."""
        if key not in config:
            raise self.error(f"{key_path}.{key}", "missing (expected a directory)")
        p = self.resolve_path(config[key])
        if not p.is_dir():
            raise self.error(f"{key_path}.{key}", f"directory '{config[key]}' not found")
        return p

    def require_experts(self, config: dict[str, Any], key: str, key_path: str, min_count: int = 1) -> list[str]:
        """A list of expert (or system) names under ``config[key]`` that the spec defines."""
        names = config.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self.error(f"{key_path}.{key}", f"expected a list of expert names, found {names!r}")
        if len(names) < min_count:
            raise self.error(f"{key_path}.{key}", f"expected at least {min_count} experts, found {len(names)}")
        for n in names:
            if n not in self.experts and n not in self.systems:
                raise self.error(f"{key_path}.{key}", f"unknown expert '{n}'; defined: {', '.join(self.names()) or 'none'}")
        return names

    def check_load_options(self, key_path: str, options: dict[str, Any]) -> None:
        """SpecError for a local model's loading option of the wrong kind or value."""
        from collab.experts import DTYPES

        allowed: dict[str, tuple[Any, ...]] = {"dtype": DTYPES, "prompt_format": ("chat_template", "plain")}
        for key, values in allowed.items():
            if key in options and options[key] not in values:
                raise self.error(f"{key_path}.{key}", f"expected one of {', '.join(values)}, found {options[key]!r}")
        if "batch_size" in options and (type(options["batch_size"]) is not int or options["batch_size"] < 1):
            raise self.error(f"{key_path}.batch_size", f"expected an integer >= 1, found {options['batch_size']!r}")
        if "allow_pickle" in options and not isinstance(options["allow_pickle"], bool):
            raise self.error(f"{key_path}.allow_pickle", f"expected true or false, found {options['allow_pickle']!r}")
        if "device" in options and not isinstance(options["device"], str):
            raise self.error(f"{key_path}.device", f"expected a device name such as 'cpu' or 'cuda:0', found {options['device']!r}")

    def _parse(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise self.error("<top>", f"expected a mapping with 'experts' and 'systems', found {type(data).__name__}")
        unknown = set(data) - {"experts", "systems"}
        if unknown:
            raise self.error(sorted(unknown)[0], "unknown top-level key (expected 'experts' and 'systems')")
        experts = data.get("experts") or {}
        systems = data.get("systems") or {}
        if not isinstance(experts, dict):
            raise self.error("experts", f"expected a mapping of name -> expert, found {type(experts).__name__}")
        if not isinstance(systems, dict):
            raise self.error("systems", f"expected a mapping of name -> system, found {type(systems).__name__}")
        if not experts and not systems:
            raise self.error("experts", "the spec defines no experts and no systems")
        for name, cfg in experts.items():
            self.experts[str(name)] = self._parse_expert(str(name), cfg)
        self._check_fallbacks(set(experts) | set(systems))
        types = system_types()
        for name, cfg in systems.items():
            kp = f"systems.{name}"
            if str(name) in self.experts:
                raise self.error(kp, f"name '{name}' is already an expert; every expert is a system under its own name")
            if not isinstance(cfg, dict):
                raise self.error(kp, f"expected a mapping with 'type', found {cfg!r}")
            if "type" not in cfg:
                raise self.error(f"{kp}.type", f"missing; expected one of {', '.join(sorted(types))}")
            if cfg["type"] not in types:
                raise self.error(f"{kp}.type", f"unknown system type '{cfg['type']}'; expected one of {', '.join(sorted(types))}")
            self.systems[str(name)] = dict(cfg)
        for name, cfg in self.systems.items():
            types[cfg["type"]]().validate(self, name, cfg)

    def _check_fallbacks(self, names: set[str]) -> None:
        """Each ``fallback`` names another system, and following them never loops."""
        for name, es in self.experts.items():
            if "fallback" not in es.options:
                continue
            kp = f"experts.{name}.fallback"
            if not es.remote:
                raise self.error(kp, "only a remote expert (url:) falls back; a local expert has no endpoint to fail")
            seen = [name]
            target = es.options["fallback"]
            while target is not None:
                if not isinstance(target, str) or target not in names:
                    raise self.error(kp, f"unknown system {target!r}; defined: {', '.join(sorted(names))}")
                if target in seen:
                    raise self.error(kp, f"fallbacks loop: {' -> '.join([*seen, target])}")
                seen.append(target)
                nxt = self.experts.get(target)
                target = nxt.options.get("fallback") if nxt is not None else None

    def _parse_expert(self, name: str, cfg: Any) -> ExpertSpec:
        kp = f"experts.{name}"
        if isinstance(cfg, str):
            cfg = {"ref": cfg}
        if not isinstance(cfg, dict):
            raise self.error(kp, f"expected a mapping with 'ref' or 'url', found {cfg!r}")
        unknown = set(cfg) - _EXPERT_KEYS
        if unknown:
            raise self.error(f"{kp}.{sorted(unknown)[0]}", f"unknown key; expected some of {', '.join(sorted(_EXPERT_KEYS))}")
        if ("ref" in cfg) == ("url" in cfg):
            raise self.error(kp, "expected exactly one of 'ref' (local model) or 'url' (remote endpoint)")
        options = {k: v for k, v in cfg.items() if k not in ("ref", "url", "model", "api_key")}
        if "url" in cfg:
            if not isinstance(cfg.get("model"), str):
                raise self.error(f"{kp}.model", "missing; a remote expert needs the model name the endpoint serves")
            if not str(cfg["url"]).startswith(("http://", "https://")):
                raise self.error(f"{kp}.url", f"expected an http(s) URL, found {cfg['url']!r}")
            for key in _REMOTE_OPTIONS:
                value = cfg.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                    raise self.error(f"{kp}.{key}", f"expected a number >= 0, found {value!r}")
            api_key = cfg.get("api_key")
            if isinstance(api_key, str) and api_key.startswith("$"):
                api_key = os.environ.get(api_key[1:])
            return ExpertSpec(name=name, url=str(cfg["url"]), model=cfg["model"], api_key=api_key, options=options)
        self.check_load_options(kp, options)
        ref = str(cfg["ref"])
        if not ref.startswith("zoo:"):
            path = self.resolve_path(ref)
            if not path.exists():
                raise self.error(f"{kp}.ref", f"'{ref}' not found (expected a model directory, a .gguf file or zoo:NAME)")
            ref = str(path)
        else:
            from collab import zoo

            if ref[4:] not in zoo.entries():
                raise self.error(f"{kp}.ref", f"unknown zoo name '{ref}'; known: {', '.join('zoo:' + n for n in sorted(zoo.entries()))}")
        return ExpertSpec(name=name, ref=ref, options=options)

    # --------------------------------------------------------------- building
    def names(self) -> list[str]:
        """Every system name: the experts first, then the systems."""
        return list(self.experts) + list(self.systems)

    def expert(self, name: str) -> Any:
        """The loaded Expert (or RemoteExpert) for an ``experts:`` entry, built once."""
        if name not in self.experts:
            raise self.error("experts", f"unknown expert '{name}'; defined: {', '.join(self.experts) or 'none'}")
        if name not in self._built:
            es = self.experts[name]
            if es.remote:
                from collab.remote import FallbackSystem, RemoteExpert

                opts = {k: es.options[k] for k in _REMOTE_OPTIONS if k in es.options}
                remote = RemoteExpert(es.url, es.model, api_key=es.api_key, name=name, **opts)
                fallback = es.options.get("fallback")
                self._built[name] = FallbackSystem(remote, self.system(fallback)) if fallback else remote
            else:
                from collab.experts import Expert

                opts = {k: es.options[k] for k in ("dtype", "device", "prompt_format", "allow_pickle", "batch_size") if k in es.options}
                self._built[name] = Expert.load(es.ref, name=name, **opts)
        return self._built[name]

    def system(self, name: str) -> Any:
        """The System called ``name``: an expert or a system, built once."""
        if name in self.experts:
            return self.expert(name)
        if name not in self.systems:
            raise self.error("systems", f"unknown system '{name}'; defined: {', '.join(self.names())}")
        if name not in self._built:
            cfg = self.systems[name]
            self._built[name] = system_types()[cfg["type"]]().build(self, name, cfg)
        return self._built[name]


def open_system(ref_or_spec: str, system: str | None = None, pick: str = "--system") -> Any:
    """A System from a spec file (``system`` picks one of its systems; optional
    when it defines exactly one) or from a model reference (``zoo:NAME``, a
    ``.gguf`` file, a model directory), loaded as an Expert. ``pick`` names, in
    errors, how the caller's user chooses a system."""
    if str(ref_or_spec).endswith((".yaml", ".yml")):
        spec = load_spec(ref_or_spec)
        if system is None:
            names = spec.names()
            if len(names) != 1:
                raise SpecError(f"{ref_or_spec}: the spec defines {len(names)} systems ({', '.join(names)}); pick one with {pick}")
            system = names[0]
        return spec.system(system)
    if system is not None:
        raise SpecError(f"{ref_or_spec}: a system name ('{system}') needs a spec file (.yaml), not a model reference")
    from collab.experts import Expert

    return Expert.load(ref_or_spec)


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a spec file; raise SpecError naming the file and key path."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SpecError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    return Spec(data, p)


class ExpertSystemType:
    """``type: expert``: a model on disk (e.g. a merge output) served as a system."""

    keys = {"type", "ref", "dtype", "device", "prompt_format", "allow_pickle", "batch_size"}

    def validate(self, spec: Spec, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        spec.reject_unknown_keys(config, kp, "expert", self.keys)
        if "ref" not in config:
            raise spec.error(f"{kp}.ref", "missing (expected a model directory, a .gguf file or zoo:NAME)")
        spec.check_load_options(kp, config)
        ref = str(config["ref"])
        if not ref.startswith("zoo:") and not spec.resolve_path(ref).exists():
            raise spec.error(f"{kp}.ref", f"'{ref}' not found")

    def build(self, spec: Spec, name: str, config: dict[str, Any]) -> Any:
        from collab.experts import Expert

        ref = str(config["ref"])
        ref = ref if ref.startswith("zoo:") else str(spec.resolve_path(ref))
        opts = {k: v for k, v in config.items() if k not in ("type", "ref")}
        return Expert.load(ref, name=name, **opts)

