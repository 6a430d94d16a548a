"""One registry of merge methods: mergekit's own and the ones collab adds.

A YAML ``merge_method`` names either a mergekit method (run by mergekit's
``run_merge``) or a collab method registered here. collab's methods are of two
engines: ``mergekit`` (a mergekit ``MergeMethod`` collab supplies, e.g.
``ties_fast``, run through ``run_merge`` so slices, filters and gradients work)
and ``collab`` (data-aware methods that need calibration statistics; run by
``merging.datamerge``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from merging.errors import MergeError

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """A method parameter: ``per_model`` ones may be set per input model."""

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodInfo:
    """What the config validator needs to know about a merge method."""

    name: str
    source: str  # "mergekit" or "collab"
    engine: str  # "mergekit" (run_merge) or "collab" (merging.datamerge)
    params: tuple[Param, ...]
    base: str  # "required", "optional", "forbidden", "ignored"
    pretty_name: str = ""
    reference_url: str = ""
    mergekit_factory: Callable[[], Any] | None = field(default=None, compare=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_COLLAB: dict[str, MethodInfo] = {}


def register(method: MethodInfo) -> MethodInfo:
    """Add a collab method; names share one key space with mergekit's methods."""
    if method.name in _COLLAB:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _COLLAB[method.name] = method
    return method


def _mergekit_info(m: Any) -> MethodInfo:
    from mergekit.merge_methods.base import ParameterScope

    params = tuple(
        Param(p.name, REQUIRED if p.required else p.default, per_model=p.scope != ParameterScope.SHARED, doc=p.description or "")
        for p in m.spec.parameters
    )
    return MethodInfo(
        name=m.spec.name,
        source="mergekit",
        engine="mergekit",
        params=params,
        base=m.spec.contract.base.value,
        pretty_name=m.spec.pretty_name or m.spec.name,
        reference_url=m.spec.reference_url or "",
    )


def mergekit_methods() -> dict[str, MethodInfo]:
    """mergekit's own methods, read from its registry (collab's are excluded)."""
    from mergekit import merge_methods

    return {m.spec.name: _mergekit_info(m) for m in merge_methods.registered_methods() if m.spec.name not in _COLLAB}


def all_methods() -> dict[str, MethodInfo]:
    out = mergekit_methods()
    out.update(_COLLAB)
    return dict(sorted(out.items()))


def get_method(name: str) -> MethodInfo:
    _load_builtin()
    if name in _COLLAB:
        return _COLLAB[name]
    known = mergekit_methods()
    if name in known:
        return known[name]
    raise MergeError(f"merge_method: unknown method {name!r}; expected one of {', '.join(all_methods())}")


def ensure_mergekit_registered(info: MethodInfo) -> None:
    """Put a collab method with a mergekit implementation into mergekit's registry
    (once per process) so that ``run_merge`` can plan it."""
    from mergekit import merge_methods

    if info.mergekit_factory is None:
        return
    if any(m.spec.name == info.name for m in merge_methods.registered_methods()):
        return
    merge_methods.register(info.mergekit_factory())


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import merging.datamerge  # noqa: F401 - registers fisher, regmean, weight_matching
    import merging.fast_ties  # noqa: F401 - registers ties_fast
