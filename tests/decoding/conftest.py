"""Tiny experts sharing one tokenizer (a base and two assistants) and heads over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def assistant_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("assistants")
    return [make_tiny_model(root / f"assistant-{i}", seed=10 + i) for i in range(2)]


@pytest.fixture(scope="session")
def assistants(assistant_dirs: list[Path]) -> list[Any]:
    from collab.experts import Expert

    return [Expert.load(d, name=f"asst{i}") for i, d in enumerate(assistant_dirs)]


def random_head(k: int, seed: int = 0, scale: float = 0.3, hidden: int = 32) -> Any:
    """A head with random deferral vectors: g_t spreads over (0, 1) on the tiny models."""
    import torch

    from decoding.head import DeferralHead

    gen = torch.Generator().manual_seed(seed)
    head = DeferralHead(hidden, k)
    head.weight.data = torch.randn(k, hidden, generator=gen) * scale
    return head.requires_grad_(False).eval()


def write_head(path: Path, head: Any, base: Any, assistants: list[Any]) -> Path:
    """A head directory as `collab decode train` writes it (without training)."""
    from collab.io import atomic_directory
    from decoding.artefact import HeadConfig, save_head

    hc = HeadConfig(
        base={"name": base.name, "ref": str(base.ref)},
        assistants=[{"name": a.name, "ref": str(a.ref)} for a in assistants],
        hidden_size=head.hidden_size,
        vocab_size=len(base.tokenizer),
    )
    with atomic_directory(path, overwrite=True) as tmp:
        save_head(tmp, head, hc)
    return path
