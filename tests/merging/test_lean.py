"""The lean merge loop (explicit reads, streaming shard writer) and its use for
``ties_fast``; mergekit's loader with explicit reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from merging import merge
from tests.merging.conftest import load_weights, max_abs_diff


def _ties_cfg(m: dict[str, Path], **extra: Any) -> dict[str, Any]:
    models = [{"model": str(m["base"])}] + [
        {"model": str(m[f"ft{i}"]), "parameters": {"weight": w, "density": d}} for i, w, d in ((1, 0.5, 0.3), (2, 0.3, 0.6), (3, 0.2, 1.0))
    ]
    return {"models": models, "base_model": str(m["base"]), "merge_method": "ties_fast", "dtype": "float32", **extra}


def test_reader_and_streaming_writer_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from merging.lean import ModelReader, StreamingShardWriter

    g = torch.Generator().manual_seed(0)
    sd = {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(4, 4, generator=g).to(torch.float16),
    }
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    r = ModelReader(src)
    assert sorted(r.names()) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(r.get(k), v) and r.get(k).dtype == v.dtype
    # Two shards of at most 40 parameters each, written out of order.
    out = tmp_path / "out"
    out.mkdir()
    w = StreamingShardWriter(out, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], shard_size=40)
    for k in ("d", "b", "a", "c"):
        w.write(k, r.get(k))
    w.close()
    r.close()
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (out / "model.safetensors.index.json").exists()
    back: dict[str, torch.Tensor] = {}
    for f in files:
        back.update(load_file(str(out / f)))
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_writer_refuses_to_close_with_missing_tensors(tmp_path: Path) -> None:
    from merging.errors import MergeError
    from merging.lean import StreamingShardWriter

    w = StreamingShardWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))], shard_size=100)
    w.write("a", torch.zeros(2))
    with pytest.raises(MergeError, match="not written"):
        w.close()


def test_lean_ties_fast_equals_mergekit_path(merge_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from merging import lean
    from merging.methods import get_method

    cfg = _ties_cfg(merge_models, parameters={"rescale": True})
    assert lean.supports(type("P", (), {"raw": cfg, "method": get_method("ties_fast")})())
    merge(cfg, tmp_path / "lean", quiet=True)
    monkeypatch.setattr(lean, "supports", lambda plan: False)
    merge(cfg, tmp_path / "mergekit", quiet=True)
    a, b = load_weights(tmp_path / "lean"), load_weights(tmp_path / "mergekit")
    assert max_abs_diff(a, b) == 0
    assert sorted(p.name for p in (tmp_path / "lean").iterdir()) == sorted(
        p.name for p in (tmp_path / "mergekit").iterdir() if p.name != "mergekit_config.yml"
    )


def _lean_parity_configs(m: dict[str, Path]) -> dict[str, dict[str, Any]]:
    fts = [m["ft1"], m["ft2"], m["ft3"]]

    def models(paths: list[Path], weights: list[float]) -> list[dict[str, Any]]:
        return [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]

    five = fts + [m["other1"], m["other2"]]
    return {
        "linear": {"merge_method": "linear", "models": models(fts, [0.5, 0.3, 0.2])},
        "linear-unnormalised-bf16": {
            "merge_method": "linear", "models": models(fts, [0.7, 0.6, -0.1]), "parameters": {"normalize": False}, "dtype": "bfloat16",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": str(m["base"]),
            "models": [{"model": str(m["base"])}] + models(fts, [0.6, 0.4, 0.9]), "parameters": {"lambda": 0.7},
        },
        "task_arithmetic-five-normalised": {
            "merge_method": "task_arithmetic", "base_model": str(m["base"]),
            "models": models(five, [0.6, 0.4, 0.9, 0.2, 0.3]), "parameters": {"normalize": True},
        },
    }


@pytest.mark.parametrize("name", ["linear", "linear-unnormalised-bf16", "task_arithmetic", "task_arithmetic-five-normalised"])
def test_lean_linear_and_task_arithmetic_equal_mergekit_cli_bit_for_bit(
    name: str, merge_models: dict[str, Path], tmp_path: Path
) -> None:
    import yaml

    from merging import lean
    from merging.methods import get_method
    from tests.merging.test_parity import run_mergekit_cli

    cfg = {"dtype": "float32", **_lean_parity_configs(merge_models)[name]}
    assert lean.supports(type("P", (), {"raw": cfg, "method": get_method(cfg["merge_method"])})())
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_mergekit_cli(path, tmp_path / "mergekit")
    merge(path, tmp_path / "lean", quiet=True)
    ours, theirs = load_weights(tmp_path / "lean"), load_weights(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert sorted(p.name for p in (tmp_path / "lean").iterdir() if p.name not in ("README.md", "merge_config.yaml")) == sorted(
        p.name for p in (tmp_path / "mergekit").iterdir() if p.name != "mergekit_config.yml"
    )


def test_configs_beyond_the_lean_loop_use_mergekit(merge_models: dict[str, Path]) -> None:
    from merging import lean
    from merging.methods import get_method

    ties = get_method("ties_fast")

    def plan(cfg: dict[str, Any], method: Any = ties) -> Any:
        return type("P", (), {"raw": cfg, "method": method})()

    base = _ties_cfg(merge_models)
    assert lean.supports(plan(base))
    assert not lean.supports(plan({**base, "parameters": {"density": [0.2, 0.8]}}))  # gradient
    assert not lean.supports(plan({**base, "tokenizer_source": "union"}))
    assert not lean.supports(plan({k: v for k, v in base.items() if k != "base_model"}))
    assert not lean.supports(plan({**base, "merge_method": "ties"}, get_method("ties")))
    linear = {"merge_method": "linear", "models": [{"model": str(merge_models["ft1"]), "parameters": {"weight": 1.0}}]}
    assert lean.supports(plan(linear, get_method("linear")))
    # mergekit's linear with a base model weighs the base too; that stays with mergekit.
    assert not lean.supports(plan({**linear, "base_model": str(merge_models["base"])}, get_method("linear")))
    ta = {**base, "merge_method": "task_arithmetic"}
    assert lean.supports(plan(ta, get_method("task_arithmetic")))
    assert not lean.supports(plan({k: v for k, v in ta.items() if k != "base_model"}, get_method("task_arithmetic")))


def test_zero_task_vectors_change_nothing() -> None:
    from merging.fast_ties import ties_merge

    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 32, generator=g)
    ft = base + 0.01 * torch.randn(64, 32, generator=g)
    one = ties_merge(base, [ft], [1.0], [0.5])
    with_zero = ties_merge(base, [ft, base.clone()], [1.0, 1.0], [0.5, 0.5])
    assert torch.equal(one, with_zero)
    assert torch.equal(ties_merge(base, [base.clone(), base.clone()], [1.0, 1.0], [0.5, 0.5]), base)


@pytest.mark.parametrize("shape", [(100,), (7, 3, 5), (64, 32)])
@pytest.mark.parametrize("n", [1, 3, 5, 6])
def test_task_arithmetic_kernel_equals_mergekits_group_merge(shape: tuple[int, ...], n: int) -> None:
    """Bit for bit, also where torch's stacked sum over more than four rows rounds
    differently from adding them in order (sizes that are not a multiple of 32)."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get as mergekit_method

    from merging.lean import LEAN_KERNELS

    g = torch.Generator().manual_seed(n)
    base = torch.randn(shape, generator=g)
    tensors = [base + torch.randn(shape, generator=g) for _ in range(n)]
    weights = [float(w) for w in torch.rand(n, generator=g) * 2 - 0.5]
    for normalize, lam in ((False, 1.0), (True, 0.7)):
        group = TensorGroup.from_tensors([base] + tensors, base_index=0)
        params = {"weight": {i + 1: w for i, w in enumerate(weights)}, "normalize": normalize, "lambda": lam}
        params |= {"density": {i + 1: 1.0 for i in range(n)}, "rescale": False, "int8_mask": False}
        theirs = mergekit_method("task_arithmetic").merge_group(group, **params)
        ours = LEAN_KERNELS["task_arithmetic"].kernel(
            base.clone(), [t.clone() for t in tensors], [{"weight": w, "normalize": normalize, "lambda": lam} for w in weights]
        )
        assert torch.equal(ours, theirs)
