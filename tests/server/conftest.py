from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from collab.server import CollabServer, ServeOptions, create_app
from tests.server.helpers import KEY, Running, Served, write_spec


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_plain_model_dir: Path) -> Path:
    return write_spec(tmp_path_factory.mktemp("serve") / "spec.yaml", {"tiny": str(tiny_model_dir), "plain": str(tiny_plain_model_dir)})


@pytest.fixture(scope="module")
def served(tiny_spec: Path) -> Iterator[Served]:
    """The tiny spec served with a key, as `collab serve` would serve it."""
    from collab.spec import load_spec

    server = CollabServer.from_spec(load_spec(tiny_spec), ServeOptions(api_key=KEY, max_wait_ms=20))
    server.load()
    with Running(create_app(server)) as running:
        yield Served(server, running)
    server.close()


@pytest.fixture(scope="module")
def client(served: Served) -> Any:
    return served.client()
