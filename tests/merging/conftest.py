"""Tiny Llama fixtures for merge tests: a base, three fine-tune stand-ins (the
base plus seeded noise) and two independently initialised models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def perturb(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    """Copy model directory ``src`` to ``dst`` with seeded Gaussian noise added to
    every weight (``scale`` times the tensor's std): a fine-tune stand-in."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(dst.glob("*.safetensors")):
        sd = load_file(str(f))
        out = {}
        for k, v in sd.items():
            noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
            out[k] = (v.float() + scale * v.float().std() * noise).to(v.dtype)
        save_file(out, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def merge_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base``, ``ft1``..``ft3`` (base + noise) and ``other1``, ``other2`` (other seeds)."""
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("merge-models")
    base = make_tiny_model(root / "base", seed=0)
    models = {"base": base}
    for i in (1, 2, 3):
        models[f"ft{i}"] = perturb(base, root / f"ft{i}", seed=100 + i)
    models["other1"] = make_tiny_model(root / "other1", seed=11)
    models["other2"] = make_tiny_model(root / "other2", seed=12)
    return models


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
