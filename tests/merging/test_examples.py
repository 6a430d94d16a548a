"""Every shipped examples/merge-*.yaml validates (methods, parameters, search
block, the files it names), with its model references pointed at tiny
stand-ins; the slow test runs each one as written, on the zoo's real experts."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merging.config import plan_merge
from merging.inputs import InputResolver, ResolvedInput

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("merge-*.yaml"))
#: The command each example's header comment gives: "#   collab merge examples/merge-X.yaml out/X [options]".
COMMAND = re.compile(r"^#\s+(collab merge \S+ \S+.*)$", re.MULTILINE)


class _StandIns(InputResolver):
    """Resolves every reference to the tiny base model."""

    def __init__(self, model: Path) -> None:
        super().__init__(model.parent, search_dirs=[], dry_run=True)
        self.model = model

    def _resolve(self, ref: str, where: str) -> ResolvedInput:
        return ResolvedInput(ref=ref, path=self.model, kind="hf")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(example: Path, merge_models: dict[str, Path]) -> None:
    from merging.engine import check
    from merging.search import check_search

    plan = plan_merge(example, lambda _path: _StandIns(merge_models["base"]))
    check(plan)  # every output tensor lays out, with its parameters resolved
    assert len(plan.model_refs) >= 2
    assert all(ref.startswith("zoo:") for ref in plan.model_refs), plan.model_refs  # shipped models only
    if plan.search is not None:
        check_search(plan)
    # the text files it names ship beside it
    for rel in (plan.parameters.get("calibration"), (plan.search or {}).get("eval")):
        if rel is not None:
            assert (example.parent / rel).is_file(), f"{example.name} names {rel}, which is not in examples/"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_states_its_command(example: Path) -> None:
    commands = COMMAND.findall(example.read_text())
    assert len(commands) == 1, f"{example.name}: expected one '#   collab merge examples/{example.name} out/NAME' line"
    assert shlex.split(commands[0])[2] == f"examples/{example.name}"


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 4


def _base_dir() -> Path:
    """The zoo's SmolLM2 as the merges read it (de-quantised safetensors)."""
    from collab.experts import dequantised_dir, resolve_ref

    return dequantised_dir(resolve_ref("zoo:smollm2-135m-instruct"))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_as_written(example: Path, tmp_path: Path) -> None:
    """The command in the example's header, run from the repository root with
    only the output directory moved into tmp_path: the result has the base
    model's tensors, differs from it, names the zoo references and generates."""
    import torch

    from collab.experts import Expert
    from collab.system import GenerationRequest
    from tests.merging.conftest import load_weights

    args = shlex.split(COMMAND.findall(example.read_text())[0])
    out = tmp_path / Path(args[3]).name
    cmd = [sys.executable, "-m", "collab.cli", "merge", args[2], str(out), *args[4:]]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"{example.name}: {seconds:.1f} s")
    assert f"wrote {out}" in done.stdout
    weights, base = load_weights(out), load_weights(_base_dir())
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in base.items()}
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in weights.values())
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[k], base[k])  # the experts' LoRA deltas reached the output
    card = (out / "README.md").read_text()
    for ref in ("zoo:smol-arith", "zoo:smol-units"):
        assert f"`{ref}`" in card
    assert "merge-work" not in card
    if "search" in example.read_text():
        rows = json.loads((out / "merge_search.json").read_text())
        assert len(rows) >= 2 and all(r["perplexity"] > 0 for r in rows)
    c = Expert.load(out).generate(GenerationRequest(messages=[{"role": "user", "content": "What is 12 + 30?"}], max_tokens=6))
    assert c.usage.completion_tokens > 0
