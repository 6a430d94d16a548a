"""collab's data-aware merge methods and the tensor-by-tensor loop that runs them.

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

import json
import os
import shutil
from pathlib import Path
from typing import Any

from merging.config import MergePlan
from merging.errors import MergeError
from merging.inputs import read_config, tensor_locations
from merging.methods import MethodInfo, Param, register

_CALIBRATION = (
    Param("calibration", doc="a .txt or .jsonl file of texts the statistics are computed on"),
    Param("calibration_samples", 64, doc="how many texts to use"),
    Param("max_length", 256, doc="tokens per text"),
)
_WEIGHT = Param("weight", 1.0, per_model=True, doc="relative weight of this model (normalised to sum 1)")

FISHER = register(
    MethodInfo(
        "fisher",
        "collab",
        "collab",
        _CALIBRATION + (_WEIGHT, Param("fisher_floor", 1e-6, doc="added to every Fisher value, so unseen parameters average")),
        base="ignored",
        pretty_name="Fisher merging",
        reference_url="https://arxiv.org/abs/2111.09832",
    )
)
REGMEAN = register(
    MethodInfo(
        "regmean",
        "collab",
        "collab",
        _CALIBRATION + (_WEIGHT, Param("alpha", 0.9, doc="scale of the Gram matrices' off-diagonal entries (1 = exact RegMean)")),
        base="ignored",
        pretty_name="RegMean",
        reference_url="https://arxiv.org/abs/2212.09849",
    )
)
WEIGHT_MATCHING = register(
    MethodInfo(
        "weight_matching",
        "collab",
        "collab",
        (_WEIGHT, Param("attention_heads", True, doc="also permute attention heads (not only MLP units)")),
        base="ignored",
        pretty_name="Weight matching (Git Re-Basin)",
        reference_url="https://arxiv.org/abs/2209.04836",
    )
)


class ShardWriter:
    """Writes tensors to safetensors shards of at most ``shard_size`` parameters,
    then names them ``model-0000k-of-0000n.safetensors`` with an index."""

    def __init__(self, out: Path, shard_size: int, dtype: Any) -> None:
        self.out, self.shard_size, self.dtype = out, shard_size, dtype
        self.pending: dict[str, Any] = {}
        self.pending_n = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: Any) -> None:
        if self.pending and self.pending_n + tensor.numel() > self.shard_size:
            self.flush()
        self.pending[name] = tensor.to(self.dtype).contiguous()
        self.pending_n += tensor.numel()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_n = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.shards[0][0], self.out / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        total = 0
        for i, (path, names) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / final)
            weight_map.update({k: final for k in names})
            total += os.path.getsize(self.out / final)
        (self.out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )


class TensorReader:
    """Reads tensors of one model directory by name, as float32."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        self.locations = tensor_locations(model_dir)
        self.handles = {p: safe_open(str(p), framework="pt") for p in set(self.locations.values())}

    def get(self, name: str) -> Any:
        loc = self.locations.get(name)
        return None if loc is None else self.handles[loc].get_tensor(name).float()


def _dtype(plan: MergePlan, ref_cfg: dict[str, Any]) -> Any:
    import torch

    name = plan.raw.get("out_dtype") or plan.raw.get("dtype") or ref_cfg.get("dtype") or ref_cfg.get("torch_dtype") or "float32"
    if not hasattr(torch, str(name)) or not isinstance(getattr(torch, str(name)), torch.dtype):
        raise MergeError(f"dtype: unknown dtype {name!r}; expected float32, bfloat16 or float16")
    return getattr(torch, str(name)), str(name)


def _shared(plan: MergePlan, name: str) -> Any:
    value = (plan.raw.get("parameters") or {}).get(name)
    if value is None:
        p = plan.method.param(name)
        if p is None or p.required:
            raise MergeError(f"parameters.{name}: required by method '{plan.method.name}' and not set")
        return p.default
    if isinstance(value, (list, dict)):
        raise MergeError(f"parameters.{name}: method '{plan.method.name}' takes one value, found {value!r} (gradients and filters are mergekit-only)")
    return value


def _calibration_path(plan: MergePlan) -> Path:
    rel = Path(str(_shared(plan, "calibration"))).expanduser()
    if rel.is_absolute():
        return rel
    for d in ([plan.source_path.parent] if plan.source_path else []) + [Path.cwd()]:
        if (d / rel).exists():
            return (d / rel).resolve()
    raise MergeError(f"parameters.calibration: file '{rel}' not found (relative to the config file or the current directory)")


def model_weights(plan: MergePlan) -> list[float]:
    """Per-model ``weight`` parameters in ``models:`` order, normalised to sum 1."""
    ws = []
    for i, m in enumerate(plan.raw["models"]):
        w = (m.get("parameters") or {}).get("weight", (plan.raw.get("parameters") or {}).get("weight", 1.0))
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise MergeError(f"models[{i}].parameters.weight: expected a number, found {w!r}")
        ws.append(float(w))
    total = sum(ws)
    if total <= 0:
        raise MergeError(f"models[*].parameters.weight: the weights must sum to a positive number, found {ws}")
    return [w / total for w in ws]


def run_collab_method(plan: MergePlan, out: Path, *, seed: int | None, progress: Any, workdir: Path, shard_size: int) -> int:
    """Run a collab-engine method into ``out`` (a temporary directory); returns the
    number of tensors written."""
    import torch
    from safetensors.torch import save_file

    if seed is not None:
        torch.manual_seed(seed)
    refs = [str(m["model"]) for m in plan.raw["models"]]
    dirs = [plan.inputs[r].path for r in refs]
    weights = model_weights(plan)
    ref_cfg = read_config(dirs[0])
    dtype, dtype_name = _dtype(plan, ref_cfg)
    names = list(tensor_locations(dirs[0]))
    method = plan.method.name
    stats: list[Path] = []
    if method in ("fisher", "regmean"):
        n_samples = int(_shared(plan, "calibration_samples"))
        max_length = int(_shared(plan, "max_length"))
        from merging.calibration import fisher_diagonal, input_grams, read_texts

        texts = read_texts(_calibration_path(plan), n_samples)
        for i, d in enumerate(dirs):
            advance = progress.start(f"{method} statistics of {refs[i]}", len(texts))
            if method == "fisher":
                s = fisher_diagonal(d, texts, max_length, advance)
            else:
                s = input_grams(d, texts, max_length, set(names), advance)
            path = workdir / f"stats-{i}.safetensors"
            save_file({k: v.contiguous() for k, v in s.items()}, str(path))
            stats.append(path)
            del s
    readers = [TensorReader(d) for d in dirs]
    perms: list[dict[str, Any]] = [{} for _ in dirs]
    if method == "weight_matching":
        perms = _match_all(readers, names, ref_cfg, bool(_shared(plan, "attention_heads")), progress)
    from merging import rebasin

    writer = ShardWriter(out, shard_size, dtype)
    advance = progress.start("merging tensors", len(names))
    stat_readers = [_StatReader(p) for p in stats]
    for name in names:
        tensors = []
        for i, r in enumerate(readers):
            t = r.get(name)
            if t is None:
                raise MergeError(f"models[{i}] ({refs[i]}): tensor '{name}' is missing")
            prefix = _layer_prefix(name)
            if prefix in perms[i]:
                t = rebasin.apply(name, t, perms[i][prefix], ref_cfg)
            tensors.append(t)
        if method == "fisher":
            merged = fisher_average(tensors, [s.get(name) for s in stat_readers], weights, float(_shared(plan, "fisher_floor")))
        elif method == "regmean" and all(s.has(name) for s in stat_readers) and tensors[0].ndim == 2:
            merged = regmean_linear(tensors, [s.get(name) for s in stat_readers], weights, float(_shared(plan, "alpha")))
        else:
            merged = sum(w * t for w, t in zip(weights, tensors))
        writer.add(name, merged)
        advance(1)
    writer.close()
    _write_config(plan, dirs[0], out, dtype_name)
    _copy_tokenizer(plan, dirs[0], out)
    return len(names)


class _StatReader:
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.f = safe_open(str(path), framework="pt")
        self.keys = set(self.f.keys())

    def has(self, name: str) -> bool:
        return name in self.keys

    def get(self, name: str) -> Any:
        return self.f.get_tensor(name) if name in self.keys else None


def fisher_average(tensors: list[Any], fishers: list[Any], weights: list[float], floor: float) -> Any:
    """sum_i w_i F_i theta_i / sum_i w_i F_i (entrywise); plain weighted average
    where a model has no Fisher for this tensor (buffers)."""
    if any(f is None for f in fishers):
        return sum(w * t for w, t in zip(weights, tensors))
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


def _match_all(readers: list[TensorReader], names: list[str], cfg: dict[str, Any], heads: bool, progress: Any) -> list[dict[str, Any]]:
    from merging import rebasin

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
            perms[p] = rebasin.match_layer(readers[0].get, r.get, p, use_cfg)
            advance(1)
        out.append(perms)
    return out


def _write_config(plan: MergePlan, ref_dir: Path, out: Path, dtype_name: str) -> None:
    cfg = read_config(ref_dir)
    cfg["dtype"] = dtype_name
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (ref_dir / "generation_config.json").exists():
        shutil.copy2(ref_dir / "generation_config.json", out / "generation_config.json")


def _copy_tokenizer(plan: MergePlan, ref_dir: Path, out: Path) -> None:
    from merging.inputs import _SIDE_FILES

    src = ref_dir
    ts = plan.resolved.get("tokenizer_source")
    if isinstance(ts, str) and ts not in ("base", "union"):
        src = Path(ts)
    elif ts == "union":
        raise MergeError(f"tokenizer_source: 'union' is mergekit-only; method '{plan.method.name}' needs models with one tokenizer")
    for name in _SIDE_FILES:
        if name not in ("config.json", "generation_config.json") and (src / name).exists():
            shutil.copy2(src / name, out / name)

