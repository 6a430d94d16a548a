"""Typed parameter settings of a merge config, and their value for one tensor.

A parameter in mergekit's YAML is a scalar (``weight: 0.5``), a gradient
interpolated over the layers (``t: [0, 0.5, 1]``), or a list of filters
(``weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]``) whose first
entry naming part of the tensor (or none) applies. ``parse`` turns the YAML
value into a ``Setting``; ``evaluate`` gives its value for one tensor at layer
position ``t`` (0 at the first layer of a slice, 1 at the last), with
mergekit's rules (``mergekit.config.evaluate_setting``) so that a merge reads
its parameters exactly as ``mergekit-yaml`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from merging.errors import MergeError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Gradient:
    """Values spread evenly over a slice's layers, interpolated in between."""

    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Conditional:
    """A filtered value: applies to tensors whose name contains ``filter``
    (every tensor when ``filter`` is None or ``*``)."""

    value: Scalar | Gradient
    filter: str | None = None


#: One parameter's setting: a scalar, a gradient, or filters tried in order.
Setting = Scalar | Gradient | tuple[Conditional, ...]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _scalar_or_gradient(value: Any, where: str) -> Scalar | Gradient:
    if _is_scalar(value):
        return value
    if isinstance(value, list) and all(_is_scalar(v) for v in value):
        return Gradient(tuple(value))
    raise MergeError(f"{where}: expected a number, a string, a boolean or a list of them (a gradient), found {value!r}")


def parse(value: Any, where: str) -> Setting:
    """The typed setting of one YAML parameter value; MergeError names ``where``."""
    if isinstance(value, dict):
        return (_conditional(value, where),)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return tuple(_conditional(v, f"{where}[{i}]") for i, v in enumerate(value))
    return _scalar_or_gradient(value, where)


def _conditional(value: dict[str, Any], where: str) -> Conditional:
    unknown = set(value) - {"value", "filter"}
    if unknown or "value" not in value:
        raise MergeError(f"{where}: a filtered setting has keys 'filter' and 'value', found {sorted(value)}")
    flt = value.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise MergeError(f"{where}.filter: expected a string, found {flt!r}")
    return Conditional(_scalar_or_gradient(value["value"], f"{where}.value"), flt)


def to_yaml(setting: Setting) -> Any:
    """The YAML value ``parse`` reads back as ``setting``."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, tuple):
        out = []
        for c in setting:
            item: dict[str, Any] = {} if c.filter is None else {"filter": c.filter}
            item["value"] = to_yaml(c.value)
            out.append(item)
        return out
    return setting


def leaves(setting: Setting) -> list[Scalar]:
    """Every scalar a setting can evaluate to (gradient ends, filter values)."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, tuple):
        return [v for c in setting for v in leaves(c.value)]
    return [setting]


def evaluate(setting: Setting, tensor_name: str, t: float, validate: Callable[[Any], Any]) -> Any:
    """The value of ``setting`` for ``tensor_name`` at layer position ``t``, or
    None when no filter matches. Numeric gradients interpolate; gradients of
    booleans or strings pick the value at ``t``."""
    if isinstance(setting, tuple):
        for c in setting:
            if c.filter is None or c.filter == "*" or (tensor_name and c.filter in tensor_name):
                return evaluate(c.value, tensor_name, t, validate)
        return None
    if isinstance(setting, Gradient):
        if not setting.values:
            return None
        values = [validate(v) for v in setting.values]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    return validate(setting)
