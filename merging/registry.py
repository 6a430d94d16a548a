"""The one registry of merge methods: mergekit's own (``merging.mergekit_methods``)
and collab's (``ties_fast``, ``fisher``, ``regmean``, ``weight_matching``).

Each entry (``merging.methods.MethodInfo``) declares its parameters and base
policy, and its streaming kernel or data-aware ``prepare`` step; config
validation, the engine, the coefficient search and ``collab merge
--list-methods`` all read it. It is filled on first use by one explicit call
(``_fill``), from mergekit's registry and collab's method modules.
"""

from __future__ import annotations

from merging.errors import MergeError
from merging.methods import MethodInfo

_METHODS: dict[str, MethodInfo] = {}


def register(method: MethodInfo) -> MethodInfo:
    """Add a method; mergekit's and collab's methods share one key space."""
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _fill() -> None:
    if _METHODS:
        return
    from mergekit import merge_methods

    from merging.datamerge import FISHER, REGMEAN, WEIGHT_MATCHING
    from merging.fast_ties import TIES_FAST
    from merging.mergekit_methods import method_info

    for m in merge_methods.registered_methods():
        if m.spec.name != TIES_FAST.name:  # registered into mergekit by the run_merge path
            register(method_info(m))
    for m in (TIES_FAST, FISHER, REGMEAN, WEIGHT_MATCHING):
        register(m)


def all_methods() -> dict[str, MethodInfo]:
    """Every method by name, sorted."""
    _fill()
    return dict(sorted(_METHODS.items()))


def mergekit_methods() -> dict[str, MethodInfo]:
    """mergekit's own methods (the ones ``mergekit-yaml`` runs)."""
    return {k: m for k, m in all_methods().items() if m.source == "mergekit"}


def get_method(name: str) -> MethodInfo:
    """The method registered as ``name``; MergeError listing the known ones."""
    _fill()
    try:
        return _METHODS[name]
    except KeyError:
        raise MergeError(f"merge_method: unknown method {name!r}; expected one of {', '.join(all_methods())}") from None
