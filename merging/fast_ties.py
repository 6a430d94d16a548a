"""``ties_fast``: TIES merging (Yadav et al. 2023) with a selection threshold.

mergekit's TIES keeps the top-``density`` fraction of each task vector by
magnitude with a full ``argsort`` of the tensor (O(n log n)). Keeping every
entry whose magnitude is at least the k-th largest (``torch.kthvalue``, O(n))
selects the same entries except among exactly equal magnitudes at the threshold,
and is several times faster on CPU. Everything else (sign election by sum,
disjoint mean, ``normalize``, ``lambda``, ``rescale``) is mergekit's arithmetic,
done one model at a time instead of on stacked copies, so the output equals
``ties`` up to those ties.
"""

from __future__ import annotations

from typing import Any

from merging.methods import MethodInfo, Param, TensorGroup

REFERENCE_URL = "https://arxiv.org/abs/2306.01708"


def magnitude_mask(tensor: Any, density: float) -> Any:
    """Boolean mask of the ``density`` fraction of largest-magnitude entries (same
    shape as ``tensor``), or None when everything is kept."""
    import torch

    if density >= 1:
        return None
    n = tensor.numel()
    if density <= 0 or n == 0:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    k = max(1, int(density * n))
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    threshold = torch.kthvalue(w, n - k + 1).values  # the k-th largest magnitude
    return (w >= threshold).reshape(tensor.shape)


def ties_merge(
    base: Any,
    tensors: list[Any],
    weights: list[float],
    densities: list[float],
    *,
    normalize: bool = True,
    lam: float = 1.0,
    rescale: bool = False,
    inplace: bool = False,
) -> Any:
    """TIES on one tensor: ``base`` plus the elected, disjointly averaged task
    vectors ``tensors[i] - base``. mergekit's arithmetic, one model at a time
    (no stacked (N, *shape) copies of deltas, signs and masks). A task vector that
    is zero everywhere (a tensor a fine-tune left alone, e.g. the embeddings of a
    LoRA) is skipped: it never agrees with the elected sign, so it changes
    nothing. ``inplace`` lets the task vectors overwrite ``tensors``."""
    import torch
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

    norm = RescaleNorm.l1 if rescale else None
    deltas, ws = [], []
    for t, weight, density in zip(tensors, weights, densities):
        delta = t.sub_(base) if inplace else t - base
        if not delta.any():
            continue
        keep = magnitude_mask(delta, density)
        if keep is not None:
            delta = rescaled_masked_tensor(delta, keep.to(delta.dtype), norm)
        w = torch.tensor(weight, dtype=delta.dtype, device=delta.device)
        deltas.append(delta.mul_(w))
        ws.append(w)
    if not deltas:
        return base
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    majority_positive = total >= 0  # TIES sign election by mass
    mixed, divisor = total.zero_(), torch.zeros_like(total)
    for d, w in zip(deltas, ws):
        agree = torch.where(majority_positive, d > 0, d < 0)
        mixed += d * agree
        divisor += w * agree
    divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def ties_fast_kernel(group: TensorGroup, params: dict[str, Any], inplace: bool = True) -> Any:
    """The streaming kernel of ``ties_fast``: ``ties_merge`` of one tensor, the
    task vectors formed in place in the freshly read inputs (unless not ``inplace``)."""
    if group.base is None:
        raise ValueError(f"ties_fast: tensor '{group.name}' has no base model input")
    others = [(r, t) for i, (r, t) in enumerate(zip(group.refs, group.tensors)) if i != group.base]
    return ties_merge(
        group.tensors[group.base],
        [t for _, t in others],
        [float(params["weight"][r]) for r, _ in others],
        [float(params["density"][r]) for r, _ in others],
        normalize=bool(params["normalize"]),
        lam=float(params["lambda"]),
        rescale=bool(params["rescale"]),
        inplace=inplace,
    )


def _factory() -> Any:
    from dataclasses import dataclass

    import torch
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod,
        GeneralizedTaskArithmeticMerge,
    )
    from mergekit.sparsify import SparsificationMethod

    @dataclass(frozen=True)
    class FastTiesMerge(GeneralizedTaskArithmeticMerge):
        """mergekit's generalized task arithmetic with TIES' magnitude pruning by threshold."""

        def merge_group(self, group: Any, /, **parameters: Any) -> torch.Tensor:
            entries = group.non_base
            if not entries:
                return group.base.tensor
            return ties_merge(
                group.base.tensor,
                [e.tensor for e in entries],
                [parameters["weight"][e.id] for e in entries],
                [parameters["density"][e.id] for e in entries],
                normalize=parameters["normalize"],
                lam=parameters["lambda"],
                rescale=parameters["rescale"],
            )

    return FastTiesMerge(
        consensus_method=ConsensusMethod.sum,
        sparsification_method=SparsificationMethod.magnitude,
        default_normalize=True,
        default_rescale=False,
        method_name="ties_fast",
        method_pretty_name="TIES (threshold selection)",
        method_reference_url=REFERENCE_URL,
    )


TIES_FAST = MethodInfo(
    name="ties_fast",
    source="collab",
    params=(
        Param("int8_mask", bool, False, doc="accepted for compatibility with ties; masks are always boolean here"),
        Param("normalize", bool, True, doc="divide by the summed weights of the agreeing models"),
        Param("rescale", bool, False, doc="rescale the kept entries to the task vector's L1 norm"),
        Param("lambda", float, 1.0, doc="scale of the merged task vector"),
        Param("weight", float, scope="non_base", doc="scale of this model's task vector"),
        Param("density", float, 1.0, scope="non_base", doc="fraction of the task vector kept"),
    ),
    base="required",
    kernel=ties_fast_kernel,
    pretty_name="TIES (threshold selection)",
    reference_url=REFERENCE_URL,
    mergekit_factory=_factory,
    inplace=True,
    memory_kernel=lambda group, params: ties_fast_kernel(group, params, inplace=False),
)
