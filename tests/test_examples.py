"""Every shipped spec in examples/ validates (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from collab.spec import load_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["experts.yaml", "zoo-experts.yaml", "zoo.yaml", "fusion.yaml"])
def test_example_spec_validates(name: str) -> None:
    spec = load_spec(EXAMPLES / name)
    assert spec.names()
    if name == "zoo.yaml":
        assert spec.systems["auto"]["type"] == "route"
