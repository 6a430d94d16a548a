from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def long_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a 1024-token window: benchmark prompts fit."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("evtiny") / "tiny-a", seed=0, max_positions=1024)


@pytest.fixture(scope="session")
def long_tiny_dir2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("evtiny") / "tiny-b", seed=1, max_positions=1024)


@pytest.fixture(scope="session")
def tiny_a(long_tiny_dir: Path):  # noqa: ANN201
    from collab.experts import Expert

    return Expert.load(long_tiny_dir, name="tiny-a")


@pytest.fixture(scope="session")
def tiny_b(long_tiny_dir2: Path):  # noqa: ANN201
    from collab.experts import Expert

    return Expert.load(long_tiny_dir2, name="tiny-b")
