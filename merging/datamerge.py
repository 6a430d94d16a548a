"""collab's data-aware merge methods: statistics over whole models first,
then a per-tensor kernel the merge engine runs like any other.

- ``fisher``: diagonal Fisher-weighted averaging (Matena & Raffel 2022):
  theta = sum_i w_i F_i theta_i / sum_i w_i F_i, per parameter entry.
- ``regmean``: Regression Mean (Jin et al. 2023): each linear weight solves
  min_W sum_i ||X_i W^T - X_i W_i^T||^2, i.e. W^T = (sum_i G_i)^-1 sum_i G_i W_i^T
  with input Gram matrices G_i = X_i^T X_i whose off-diagonal entries are scaled
  by ``alpha``; other tensors are averaged.
- ``weight_matching``: Git Re-Basin permutation alignment (``merging.rebasin``),
  then a weighted average.

Statistics are computed one model at a time, saved to the work directory and
read back per tensor, so memory holds one model (and its statistics) at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merging.errors import MergeError
from merging.methods import Kernel, MethodInfo, Param, PrepareContext, TensorGroup
from merging.tensorio import ModelReader, SafetensorsReader, read_config

_CALIBRATION = (
    Param("calibration", str, doc="a .txt or .jsonl file of texts the statistics are computed on"),
    Param("calibration_samples", int, 64, doc="how many texts to use"),
    Param("max_length", int, 256, doc="tokens per text"),
)
_WEIGHT = Param("weight", float, 1.0, scope="input", doc="relative weight of this model (normalised to sum 1)")


def _calibration_path(ctx: PrepareContext) -> Path:
    rel = Path(str(ctx.params["calibration"])).expanduser()
    if rel.is_absolute():
        return rel
    for d in ([ctx.config_dir] if ctx.config_dir else []) + [Path.cwd()]:
        if (d / rel).exists():
            return (d / rel).resolve()
    raise MergeError(f"parameters.calibration: file '{rel}' not found (relative to the config file or the current directory)")


def _float_inputs(group: TensorGroup) -> list[Any]:
    return [t.float() for t in group.tensors]


def weighted_sum(tensors: list[Any], weights: list[float]) -> Any:
    """sum_i w_i t_i, formed in place in ``tensors`` (fresh copies the engine
    read for this tensor), so no temporary of the tensor's size is made."""
    acc = tensors[0].mul_(weights[0])
    for w, t in zip(weights[1:], tensors[1:]):
        acc += t.mul_(w)
    return acc


class _Stats:
    """Per-model statistics saved in the work directory, read back per tensor."""

    def __init__(self, ctx: PrepareContext, method: str, compute: Any) -> None:
        from safetensors.torch import save_file

        from merging.calibration import read_texts

        texts = read_texts(_calibration_path(ctx), int(ctx.params["calibration_samples"]))
        self.readers: list[SafetensorsReader] = []
        for i, d in enumerate(ctx.dirs):
            advance = ctx.progress.start(f"{method} statistics of {ctx.refs[i]}", len(texts))
            stats = compute(d, texts, int(ctx.params["max_length"]), advance)
            path = ctx.workdir / f"stats-{i}.safetensors"
            save_file({k: v.contiguous() for k, v in stats.items()}, str(path))
            del stats
            self.readers.append(SafetensorsReader(path))

    def get(self, name: str) -> list[Any] | None:
        """Every model's statistic of ``name``, or None if some model has none."""
        if not all(name in r.header for r in self.readers):
            return None
        return [r.get_tensor(name) for r in self.readers]


def _prepare_fisher(ctx: PrepareContext) -> Kernel:
    from merging.calibration import fisher_diagonal

    stats = _Stats(ctx, "fisher", fisher_diagonal)
    floor = float(ctx.params["fisher_floor"])

    def kernel(group: TensorGroup, params: dict[str, Any]) -> Any:
        fishers = stats.get(group.name)
        merged = fisher_average(_float_inputs(group), fishers or [None] * len(group.tensors), ctx.weights, floor)
        return merged.to(group.tensors[0].dtype)

    return kernel


def _prepare_regmean(ctx: PrepareContext) -> Kernel:
    from merging.calibration import input_grams

    names = set(ctx.names)
    stats = _Stats(ctx, "regmean", lambda d, texts, n, advance: input_grams(d, texts, n, names, advance))
    alpha = float(ctx.params["alpha"])

    def kernel(group: TensorGroup, params: dict[str, Any]) -> Any:
        tensors = _float_inputs(group)
        grams = stats.get(group.name)
        if grams is not None and tensors[0].ndim == 2:
            merged = regmean_linear(tensors, grams, ctx.weights, alpha)
        else:
            merged = weighted_sum(tensors, ctx.weights)
        return merged.to(group.tensors[0].dtype)

    return kernel


def _prepare_weight_matching(ctx: PrepareContext) -> Kernel:
    from merging.rebasin import apply

    cfg = read_config(ctx.dirs[0])
    readers = [ModelReader(d) for d in ctx.dirs]
    try:
        perms = _match_all(readers, ctx.names, cfg, bool(ctx.params["attention_heads"]), ctx.progress)
    finally:
        for r in readers:
            r.close()

    def kernel(group: TensorGroup, params: dict[str, Any]) -> Any:
        tensors = _float_inputs(group)
        prefix = _layer_prefix(group.name)
        for i in range(len(tensors)):
            if prefix in perms[i]:
                tensors[i] = apply(group.name, tensors[i], perms[i][prefix], cfg)
        return weighted_sum(tensors, ctx.weights).to(group.tensors[0].dtype)

    return kernel


FISHER = MethodInfo(
    "fisher",
    "collab",
    _CALIBRATION + (_WEIGHT, Param("fisher_floor", float, 1e-6, doc="added to every Fisher value, so unseen parameters average")),
    base="ignored",
    prepare=_prepare_fisher,
    pretty_name="Fisher merging",
    reference_url="https://arxiv.org/abs/2111.09832",
    whole_model=True,
    inplace=True,
)
REGMEAN = MethodInfo(
    "regmean",
    "collab",
    _CALIBRATION + (_WEIGHT, Param("alpha", float, 0.9, doc="scale of the Gram matrices' off-diagonal entries (1 = exact RegMean)")),
    base="ignored",
    prepare=_prepare_regmean,
    pretty_name="RegMean",
    reference_url="https://arxiv.org/abs/2212.09849",
    whole_model=True,
    inplace=True,
)
WEIGHT_MATCHING = MethodInfo(
    "weight_matching",
    "collab",
    (_WEIGHT, Param("attention_heads", bool, True, doc="also permute attention heads (not only MLP units)")),
    base="ignored",
    prepare=_prepare_weight_matching,
    pretty_name="Weight matching (Git Re-Basin)",
    reference_url="https://arxiv.org/abs/2209.04836",
    whole_model=True,
    inplace=True,
)


def fisher_average(tensors: list[Any], fishers: list[Any], weights: list[float], floor: float) -> Any:
    """sum_i w_i F_i theta_i / sum_i w_i F_i (entrywise); plain weighted average
    where a model has no Fisher for this tensor (buffers), formed in place in
    ``tensors``."""
    if any(f is None for f in fishers):
        return weighted_sum(tensors, weights)
    num = sum(w * (f + floor) * t for w, f, t in zip(weights, fishers, tensors))
    den = sum(w * (f + floor) for w, f in zip(weights, fishers))
    return num / den


def regmean_linear(tensors: list[Any], grams: list[Any], weights: list[float], alpha: float) -> Any:
    """RegMean for one linear weight (out, in) from input Grams (in, in)."""
    import torch

    def scaled(g: Any) -> Any:
        return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))

    gs = [w * scaled(g.double()) for w, g in zip(weights, grams)]
    lhs = sum(gs)  # (in, in)
    rhs = sum(g @ t.double().T for g, t in zip(gs, tensors))  # (in, out)
    ridge = 1e-10 * torch.diagonal(lhs).mean().clamp_min(1e-30)
    eye = torch.eye(lhs.shape[0], dtype=lhs.dtype)
    return torch.linalg.solve(lhs + ridge * eye, rhs).T.float()  # (out, in)


def _layer_prefix(name: str) -> str | None:
    import re

    m = re.match(r"(.*\.layers\.\d+\.)", name)
    return m.group(1) if m else None


def _match_all(readers: list[ModelReader], names: list[str], cfg: dict[str, Any], heads: bool, progress: Any) -> list[dict[str, Any]]:
    from merging.rebasin import match_layer

    def getter(r: ModelReader) -> Any:
        return lambda name: r.get(name).float() if r.has(name) else None

    if cfg.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "smollm3"):
        raise MergeError(
            f"weight_matching: architecture '{cfg.get('model_type')}' is not supported (Llama-style decoders with "
            "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj are)"
        )
    prefixes = sorted({p for p in (_layer_prefix(n) for n in names) if p}, key=lambda p: int(p.rstrip(".").rsplit(".", 1)[1]))
    out: list[dict[str, Any]] = [{}]
    use_cfg = cfg if heads else {**cfg, "num_attention_heads": 0}
    for i, r in enumerate(readers[1:], 1):
        advance = progress.start(f"weight matching model {i}", len(prefixes))
        perms = {}
        for p in prefixes:
            perms[p] = match_layer(getter(readers[0]), getter(r), p, use_cfg)
            advance(1)
        out.append(perms)
    return out
