"""Every shipped examples/merge-*.yaml validates (methods, parameters, search
block), with its model references pointed at tiny stand-ins."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from merging.config import plan_merge
from merging.inputs import InputResolver, ResolvedInput

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("merge-*.yaml"))


class _StandIns(InputResolver):
    """Resolves every reference to the tiny base model."""

    def __init__(self, model: Path) -> None:
        super().__init__(model.parent, search_dirs=[], dry_run=True)
        self.model = model

    def _resolve(self, ref: str, where: str) -> ResolvedInput:
        return ResolvedInput(ref=ref, path=self.model, kind="hf")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(example: Path, merge_models: dict[str, Path], tmp_path: Path) -> None:
    from merging.search import check_search

    cfg = tmp_path / example.name
    shutil.copy(example, cfg)
    (tmp_path / "calibration.jsonl").write_text('{"text": "hello"}\n')
    plan = plan_merge(cfg, lambda _path: _StandIns(merge_models["base"]))
    assert len(plan.model_refs) >= 2
    if plan.search is not None:
        check_search(plan)


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 4
