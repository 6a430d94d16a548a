"""What ships with collab for routing: the routing tables behind the ``--data`` shorthands
(inside the ``routers`` package, so a wheel has them) and the zoo's trained router."""

from __future__ import annotations

import glob
import json
import tomllib
from pathlib import Path

import pytest

import routers
from routers.table import ROUTING_DATA, load_table

PACKAGE = Path(routers.__file__).resolve().parent
ROOT = PACKAGE.parent
ZOO_ROUTER = ROOT / "examples" / "artefacts" / "zoo-router"


def _shipped_files() -> list[Path]:
    return sorted(p for p in ROUTING_DATA.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "shorthand, files",
    [
        ("llmrouter", ["llmrouter/train.json"]),
        ("routellm-gsm8k", ["routellm/gsm8k_responses.csv"]),
        ("routellm-mmlu", ["routellm/mmlu"]),
    ],
)
def test_shorthands_read_the_copies_inside_the_package(shorthand: str, files: list[str]) -> None:
    assert ROUTING_DATA == PACKAGE / "data" / "routing"
    t = load_table(shorthand)
    assert [Path(s) for s in t.source.split("+")] == [ROUTING_DATA / f for f in files]
    assert len(t) > 1000


def test_shipped_tables_keep_their_licences_and_stay_small() -> None:
    for source in ("llmrouter", "routellm"):
        assert (ROUTING_DATA / source / "LICENSE").stat().st_size > 500
        assert len((ROUTING_DATA / source / "SOURCE_COMMIT").read_text().split()[0]) == 40
    assert "MIT License" in (ROUTING_DATA / "llmrouter" / "LICENSE").read_text()
    assert "Apache License" in (ROUTING_DATA / "routellm" / "LICENSE").read_text()
    assert len(list((ROUTING_DATA / "routellm" / "mmlu").glob("mmlu_*.csv"))) == 57
    assert sum(p.stat().st_size for p in _shipped_files()) < 50e6


def test_package_data_globs_cover_every_shipped_file() -> None:
    """pyproject's package-data for ``routers`` must match each file, or a wheel lacks it."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    matched = {PACKAGE / m for pattern in cfg.get("routers", []) for m in glob.glob(pattern, root_dir=PACKAGE, recursive=True)}
    missing = [str(p.relative_to(PACKAGE)) for p in _shipped_files() if p not in matched]
    assert not missing, f"pyproject.toml [tool.setuptools.package-data] routers: no pattern matches {missing[:5]}"


def test_zoo_router_records_no_machine_paths_and_its_training_table() -> None:
    from collab.io import sha256_file
    from routers.base import Router, prompt_digest

    text = (ZOO_ROUTER / "config.json").read_text()
    assert "/work/" not in text and "/home/" not in text
    cfg = json.loads(text)
    dev = ROOT / "examples" / "routing" / "zoo-dev.jsonl"
    assert cfg["meta"]["train_sources"] == [{"name": "zoo-dev.jsonl", "kind": "file", "sha256": sha256_file(dev)}]
    table = load_table(dev)
    assert cfg["train_hash"] == table.content_hash()
    r = Router.load(ZOO_ROUTER)
    assert r.train_prompts == sorted({prompt_digest(p) for p in table.prompts})
