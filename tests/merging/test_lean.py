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


def test_zero_task_vectors_change_nothing() -> None:
    from merging.fast_ties import ties_merge

    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 32, generator=g)
    ft = base + 0.01 * torch.randn(64, 32, generator=g)
    one = ties_merge(base, [ft], [1.0], [0.5])
    with_zero = ties_merge(base, [ft, base.clone()], [1.0, 1.0], [0.5, 0.5])
    assert torch.equal(one, with_zero)
    assert torch.equal(ties_merge(base, [base.clone(), base.clone()], [1.0, 1.0], [0.5, 0.5]), base)
