"""mergekit's merge methods as entries of collab's registry, each with a
streaming kernel that calls mergekit's own per-tensor implementation.

mergekit 0.1.5 exposes every method as a ``MergeMethod`` object that merges
``TensorGroup``s (``method(groups, parameters=...)``), importable without
transformers; the engine builds one group per output tensor and calls it, so
the arithmetic (and the random draws of ``dare_*`` and ``della*``) is
mergekit's. The one exception is ``task_arithmetic``, whose kernel here forms
the task vectors in place in the freshly read input tensors instead of
stacking copies (same operations in the same order, so the same bits: pinned
against mergekit's kernel by tests/merging/test_engine.py); on tensors held in
memory, which must not change, mergekit's own kernel runs.
"""

from __future__ import annotations

from typing import Any

from merging.methods import REQUIRED, MethodInfo, Param, TensorGroup


class MergekitKernel:
    """The streaming kernel of mergekit method ``name``: one ``TensorGroup`` in,
    mergekit's merged tensor out."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, group: TensorGroup, params: dict[str, Any]) -> Any:
        from mergekit import merge_methods
        from mergekit.merge_methods.base import TensorEntry, TensorMetadata
        from mergekit.merge_methods.base import TensorGroup as MergekitGroup

        entries = tuple(
            TensorEntry(id=ref, tensor=t, is_base=i == group.base) for i, (ref, t) in enumerate(zip(group.refs, group.tensors))
        )
        (result,) = merge_methods.get(self.name)((MergekitGroup(entries=entries, metadata=TensorMetadata(name=group.name)),), parameters=params)
        return result


def task_arithmetic_kernel(group: TensorGroup, params: dict[str, Any]) -> Any:
    """mergekit's ``task_arithmetic`` (generalized task arithmetic without
    sparsification or sign consensus): the weighted task vectors summed over
    the models, as ``stack(...).sum(dim=0)`` does, without the stacked copy."""
    import torch

    base = group.tensors[group.base] if group.base is not None else None
    if base is None:
        raise ValueError(f"task_arithmetic: tensor '{group.name}' has no base model input")
    others = [(r, t) for i, (r, t) in enumerate(zip(group.refs, group.tensors)) if i != group.base]
    if not others:
        return base
    weights = torch.tensor([float(params["weight"][r]) for r, _ in others], dtype=base.dtype)
    deltas = [t.sub_(base).mul_(w) for (_, t), w in zip(others, weights.unbind(0))]
    if len(deltas) <= 4:
        # torch's sum over dim 0 adds up to four rows in order (it keeps four
        # accumulators); beyond that only the stacked sum gives its rounding.
        mixed = torch.zeros_like(base)
        for d in deltas:
            mixed += d
    else:
        mixed = torch.stack(deltas).sum(dim=0)
    del deltas
    if params["normalize"]:
        divisor = weights.sum(dim=0)
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return (base + mixed).to(base.dtype)


#: collab's kernels for mergekit methods (same output, less memory).
_OWN_KERNELS = {"task_arithmetic": task_arithmetic_kernel}


def method_info(m: Any) -> MethodInfo:
    """The registry entry of mergekit ``MergeMethod`` ``m``."""
    from mergekit.merge_methods.base import MISSING

    spec = m.spec
    c = spec.contract
    params = tuple(
        Param(
            p.name,
            p.value_type,
            default=p.default if p.default is not MISSING else REQUIRED,
            scope=p.scope.value,
            doc=p.description or "",
            validate=p.validate,
        )
        for p in spec.parameters
    )
    return MethodInfo(
        name=spec.name,
        source="mergekit",
        params=params,
        base=c.base.value,
        kernel=_OWN_KERNELS.get(spec.name) or MergekitKernel(spec.name),
        pretty_name=spec.pretty_name or spec.name,
        reference_url=spec.reference_url or "",
        min_inputs=c.min_inputs,
        max_inputs=c.max_inputs,
        min_non_base=c.min_non_base,
        max_non_base=c.max_non_base,
        optional_tensors=spec.optional_tensor_policy.value,
        inplace=spec.name in _OWN_KERNELS,
        memory_kernel=MergekitKernel(spec.name) if spec.name in _OWN_KERNELS else None,
    )
