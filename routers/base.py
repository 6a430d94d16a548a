"""The Router base class, its artefact format and the one registry of router kinds.

A router predicts, for each prompt, every expert's expected score in [0, 1]:
``predict(prompts) -> (n, E)``. Policies (``routers.policies``) turn those
predictions (and costs) into a choice. A trained router is a directory with
``config.json`` (type, version, experts, encoder, hyper-parameters, the
training table's hash) and ``router.safetensors``. No pickle.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from collab.errors import CollabError
from routers.table import RoutingTable

FORMAT_VERSION = 1

#: In a router directory: the ``prompt_digest`` of each training prompt, one per line.
TRAIN_PROMPTS_FILE = "train_prompts.sha256"

REGISTRY: dict[str, type["Router"]] = {}


class RouterError(CollabError, ValueError):
    """A router artefact or router configuration that is not valid."""


def prompt_digest(prompt: str) -> str:
    """The first 16 hex digits of the prompt's SHA-256: how a router records its training prompts."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def register_router(key: str) -> Callable[[type["Router"]], type["Router"]]:
    """Class decorator: register a Router under the lowercase key used on the CLI and in config.json."""

    def deco(cls: type[Router]) -> type[Router]:
        if key != key.lower():
            raise ValueError(f"router key must be lowercase, found {key!r}")
        cls.key = key
        REGISTRY[key] = cls
        return cls

    return deco


def router_names() -> list[str]:
    _import_all()
    return sorted(REGISTRY)


def _import_all() -> None:
    import importlib

    for module in ("routers.adapt", "routers.auto", "routers.baselines", "routers.bert", "routers.guard", "routers.learned", "routers.population"):
        importlib.import_module(module)


def make_router(key: str, **overrides: Any) -> "Router":
    """An unfitted router of kind ``key`` with config fields overridden by ``overrides``."""
    _import_all()
    if key not in REGISTRY:
        raise RouterError(f"--router: unknown router '{key}'; expected one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[key]
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    bad = sorted(set(overrides) - fields - {"seed"})
    if bad:
        raise RouterError(f"router '{key}': unknown option '{bad[0]}'; expected some of {', '.join(sorted(fields))}")
    seed = overrides.pop("seed", None)
    hints = typing.get_type_hints(cls.config_cls)
    overrides = {k: _checked_option(key, k, v, hints.get(k, Any)) for k, v in overrides.items()}
    cfg = cls.config_cls(**overrides)
    if seed is not None:
        cfg.seed = seed
    check_bounds(key, cfg)
    return cls(cfg)


_KINDS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _checked_option(key: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` if it has the kind the config field ``name`` declares (integers become
    floats for float fields, a single value a one-item tuple for list fields), else a
    RouterError naming the option."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if value is None and union and type(None) in typing.get_args(hint):
        return value
    options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    wanted = []
    for h in options:
        origin = typing.get_origin(h) or h
        if origin in (tuple, list, collections.abc.Sequence):
            return value if isinstance(value, (list, tuple)) else (value,)  # '-o clusters=24' means one
        if h in _KINDS:
            what, ok = _KINDS[h]
            if ok(value):
                return float(value) if h is float else value
            wanted.append(what)
        else:
            return value  # a kind this check does not know (Any, dicts): the router validates it
    raise RouterError(f"router '{key}': option '{name}': expected {' or '.join(wanted)}, found {value!r}")


@dataclasses.dataclass(frozen=True)
class Bound:
    """The numbers an option accepts: ``low <= x <= high`` (``<`` where the end is open);
    for a list option, every number in it. ``None``: no bound on that side."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def admits(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return self.high is None or (x < self.high if self.open_high else x <= self.high)

    def describe(self) -> str:
        lo = None if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
        hi = None if self.high is None else f"{'<' if self.open_high else '<='} {self.high:g}"
        if lo and hi:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        return lo or hi or "any number"


AT_LEAST_1 = Bound(1)
NON_NEGATIVE = Bound(0)
POSITIVE = Bound(0, open_low=True)
UNIT = Bound(0, 1)


def check_bounds(key: str, config: Any) -> None:
    """RouterError naming the first option of ``config`` outside its ``bounds`` (e.g. ``k=0``)."""
    for name, bound in option_bounds(type(config)).items():
        value = getattr(config, name)
        for x in _numbers(value):
            if not bound.admits(x):
                if isinstance(value, (list, tuple)):
                    what, shown = "numbers each", f"{x:g} in {list(value)!r}"
                else:
                    what, shown = ("an integer" if isinstance(value, int) else "a number"), f"{value!r}"
                raise RouterError(f"router '{key}': option '{name}': expected {what} {bound.describe()}, found {shown}")


def option_bounds(config_cls: type) -> dict[str, Bound]:
    """The ``bounds`` of ``config_cls`` and of the configs it extends (``seed`` from RouterConfig)."""
    out: dict[str, Bound] = {}
    for klass in reversed(config_cls.__mro__):
        out.update(vars(klass).get("bounds", {}))
    return out


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return []


@dataclasses.dataclass
class RouterConfig:
    """Fields every router config has. A subclass lists in ``bounds`` the range of each
    numeric option where some values are meaningless (``k=0`` neighbours); ``make_router``
    and ``fit`` refuse values outside it, naming the option (a subclass's ``bounds`` add to these)."""

    bounds: ClassVar[dict[str, Bound]] = {"seed": NON_NEGATIVE}

    encoder: str = "minilm"
    """Text encoder: 'minilm', 'tfidf', 'lm' (a causal LM's pooled hidden states), or several joined by '+'."""
    seed: int = 0
    """Seed for anything random in training."""


class Router:
    """Base class: subclasses set ``config_cls`` and implement ``_fit``, ``_predict_features``,
    ``_state`` and ``_load_state``. Encoders are handled here."""

    key: ClassVar[str] = "router"
    config_cls: ClassVar[type] = RouterConfig
    reference_url: ClassVar[str | None] = None
    uses_encoder: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_cls()
        self.experts: list[str] = []
        self.train_hash: str | None = None
        self.train_prompts: list[str] | None = None
        """``prompt_digest`` of each training prompt (None for routers saved before it was recorded):
        lets ``route eval`` tell which rows of a table the router was trained on."""
        self.encoder: Any = None
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------ training
    def fit(self, table: RoutingTable) -> "Router":
        """Train on a routing table (its experts become the router's experts)."""
        if len(table) == 0:
            raise RouterError(f"{table.source}: cannot train a router on an empty table")
        check_bounds(self.key, self.config)
        self.experts = list(table.experts)
        self.train_hash = table.content_hash()
        self.train_prompts = sorted({prompt_digest(p) for p in table.prompts})
        x = None
        if self.uses_encoder:
            from routers.encoders import make_encoder

            self.encoder = make_encoder(self.config.encoder)
            if hasattr(self.encoder, "fit"):
                self.encoder.fit(table.prompts)
            x = self.encoder.encode(table.prompts)
        self._fit(x, table)
        return self

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ inference
    def features(self, prompts: Sequence[str]) -> np.ndarray | None:
        """The encoder's features for ``prompts`` (None for routers that use no encoder)."""
        if not self.uses_encoder:
            return None
        if self.encoder is None:
            raise RouterError(f"router '{self.key}': not fitted")
        return self.encoder.encode(list(prompts))

    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        """(n, E) predicted score of each expert for each prompt, in ``self.experts`` order."""
        if not self.experts:
            raise RouterError(f"router '{self.key}': not fitted (call fit or load)")
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, len(self.experts)))
        return self.predict_features(self.features(prompts), prompts)

    def predict_features(self, x: np.ndarray | None, prompts: Sequence[str]) -> np.ndarray:
        """Predictions from precomputed features (lets ensembles and benchmarks encode once)."""
        out = np.asarray(self._predict_features(x, list(prompts)), dtype=np.float64)
        return np.clip(out, 0.0, 1.0)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def explain(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        """Predictions and, per prompt, a note for the trace (a dict with at least 'reason'),
        or None where the router has nothing to add. The guard (``guarded``) reports here
        whether a prompt was out of distribution."""
        prompts = list(prompts)
        return self.predict(prompts), [None] * len(prompts)

    def children(self) -> list["Router"]:
        """Routers this one delegates to (an ensemble's members, a guard's base)."""
        return []

    def to(self, device: str) -> "Router":
        """Run every neural encoder of this router (and of its children) on ``device``:
        'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'. The routers' own heads stay NumPy."""
        from routers.encoders import check_device

        device = check_device(device)
        if self.encoder is not None and hasattr(self.encoder, "to"):
            self.encoder.to(device)
        for child in self.children():
            child.to(device)
        return self

    # ------------------------------------------------------------ artefacts
    def _state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_state(self, tensors: dict[str, np.ndarray]) -> None:
        pass

    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def config_json(self) -> dict[str, Any]:
        enc = self.encoder.config() if self.encoder is not None else None
        return {
            "type": self.key,
            "version": FORMAT_VERSION,
            "experts": list(self.experts),
            "encoder": enc,
            "hyperparameters": self.hyperparameters(),
            "train_hash": self.train_hash,
            "meta": self.meta,
            "reference_url": self.reference_url,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``router.safetensors`` to ``directory`` atomically
        (replacing what is there; ``collab route train`` refuses that without ``--overwrite``)."""
        from collab.io import atomic_directory

        if not self.experts:
            raise RouterError(f"router '{self.key}': nothing to save, it is not fitted")
        with atomic_directory(directory, overwrite=True) as tmp:
            self.save_into(tmp)
        return Path(directory)

    def save_into(self, directory: Path) -> None:
        """Write the artefact's files into the existing (empty) ``directory``, not atomically:
        ``save`` and ``routers.api.train_router`` call it inside ``collab.io.atomic_directory``."""
        from safetensors.numpy import save_file

        from collab.io import atomic_write_json
        from routers.encoders import encoder_state

        if not self.experts:
            raise RouterError(f"router '{self.key}': nothing to save, it is not fitted")
        tensors = {f"router.{k}": np.ascontiguousarray(v) for k, v in self._state().items()}
        if self.encoder is not None:
            tensors.update({f"encoder.{k}": np.ascontiguousarray(v) for k, v in encoder_state(self.encoder).items()})
        if not tensors:
            tensors = {"empty": np.zeros(1, dtype=np.float32)}
        save_file(tensors, str(directory / "router.safetensors"))
        if self.train_prompts is not None:
            (directory / TRAIN_PROMPTS_FILE).write_text("".join(h + "\n" for h in self.train_prompts), encoding="utf-8")
        self._save_extra(directory)
        atomic_write_json(directory / "config.json", self.config_json())

    def _save_extra(self, directory: Path) -> None:
        """Subclasses that need more files (an ensemble's members) write them here."""

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Router":
        """Load any registered router from its directory (the type is read from config.json)."""
        from safetensors.numpy import load_file

        from routers.encoders import load_encoder

        d = Path(directory)
        cfg_path = d / "config.json"
        if not d.is_dir():
            raise RouterError(f"{d}: router directory not found")
        if not cfg_path.is_file():
            raise RouterError(f"{d}: no config.json (not a trained router directory)")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RouterError(f"{cfg_path}: not valid JSON ({e.msg})") from e
        _import_all()
        kind = cfg.get("type")
        if kind not in REGISTRY:
            raise RouterError(f"{cfg_path}: type: unknown router '{kind}'; expected one of {', '.join(sorted(REGISTRY))}")
        if int(cfg.get("version", 0)) > FORMAT_VERSION:
            raise RouterError(f"{cfg_path}: version {cfg.get('version')} is newer than this collab reads ({FORMAT_VERSION})")
        klass = REGISTRY[kind]
        fields = {f.name for f in dataclasses.fields(klass.config_cls)}
        hp = {k: v for k, v in (cfg.get("hyperparameters") or {}).items() if k in fields}
        router = klass(klass.config_cls(**hp))
        experts = cfg.get("experts")
        if not isinstance(experts, list) or not experts:
            raise RouterError(f"{cfg_path}: experts: expected a non-empty list of expert names, found {experts!r}")
        router.experts = [str(e) for e in experts]
        router.train_hash = cfg.get("train_hash")
        tp = d / TRAIN_PROMPTS_FILE
        router.train_prompts = tp.read_text(encoding="utf-8").split() if tp.is_file() else None
        router.meta = cfg.get("meta") or {}
        st = d / "router.safetensors"
        if not st.is_file():
            raise RouterError(f"{d}: router.safetensors not found")
        tensors = load_file(str(st))
        if cfg.get("encoder") is not None:
            enc_t = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
            router.encoder = load_encoder(cfg["encoder"], enc_t)
        router._load_state({k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")})
        router._load_extra(d)
        return router

    def _load_extra(self, directory: Path) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts={self.experts}, config={self.config})"


class WrapperRouter(Router):
    """A router around one other router, ``base``, which is saved in ``base/`` beside the
    wrapper's config.json and loaded back with it (``collab route adapt``'s adapted router,
    the out-of-distribution guard)."""

    wrapper_noun: ClassVar[str] = "wrapper"
    """How errors name the wrapper: "... differ from the {wrapper_noun}'s ..."."""

    def __init__(self, config: Any = None, base: Router | None = None) -> None:
        super().__init__(config)
        self.base: Router | None = base

    def children(self) -> list[Router]:
        return [self.base] if self.base is not None else []

    def _save_extra(self, directory: Path) -> None:
        assert self.base is not None
        self.base.save(directory / "base")

    def _load_extra(self, directory: Path) -> None:
        self.base = Router.load(directory / "base")
        if self.base.experts != self.experts:
            raise RouterError(f"{directory}/base: experts {self.base.experts} differ from the {self.wrapper_noun}'s {self.experts}")
