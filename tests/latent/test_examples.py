"""examples/latent.yaml validates: in place once its checkpoint is shipped, and
always against a stand-in checkpoint that names the same zoo experts (no model loads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from collab.spec import load_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "latent.yaml"


def test_example_spec_validates_against_its_checkpoint(tmp_path: Path) -> None:
    import yaml

    spec_data = yaml.safe_load(EXAMPLE.read_text())
    ckpt_dir = EXAMPLE.parent / spec_data["systems"]["mot"]["checkpoint"]
    if not ckpt_dir.is_dir():  # not shipped yet: a stand-in with the experts the spec names
        shutil.copy(EXAMPLE, tmp_path / "latent.yaml")
        stand_in = tmp_path / spec_data["systems"]["mot"]["checkpoint"]
        stand_in.mkdir(parents=True)
        refs = [spec_data["experts"][n]["ref"] for n in spec_data["systems"]["mot"]["experts"]]
        experts = [{"name": n, "ref": r, "hidden_size": 1, "layers": 1, "cuts": [1]} for n, r in zip(spec_data["systems"]["mot"]["experts"], refs)]
        (stand_in / "config.json").write_text(json.dumps({
            "type": "mot", "version": 1, "experts": experts, "stacks": 4, "top_k": 2, "latent_dim": 128, "heads": 4, "encoder": {"type": "minilm"},
        }))
        spec = load_spec(tmp_path / "latent.yaml")
    else:
        spec = load_spec(EXAMPLE)
    assert spec.systems["mot"]["type"] == "latent" and spec.systems["mot-k1"]["top_k"] == 1
    assert spec.experts["smol"].ref == "zoo:smollm2-135m-instruct" and spec.experts["gemma"].ref == "zoo:gemma3-270m"


@pytest.mark.slow
def test_shipped_example_builds_and_answers() -> None:
    """The real zoo models: the shipped checkpoint loads and answers (minutes on two cores)."""
    import yaml

    ckpt = EXAMPLE.parent / yaml.safe_load(EXAMPLE.read_text())["systems"]["mot"]["checkpoint"]
    assert (ckpt / "config.json").is_file() and (ckpt / "weights.safetensors").is_file(), f"{ckpt}: the shipped checkpoint is missing"
    from collab.system import GenerationRequest

    mot = load_spec(EXAMPLE).system("mot")
    c = mot.generate(GenerationRequest.chat("Which gas do plants take in from the air?", max_tokens=16))
    assert c.text and c.trace["primary"] in ("smol", "gemma") and len(c.trace["experts"]) == 2
    ll = mot.loglikelihood_batch([("Question: Which gas do plants take in from the air?\nAnswer:", " carbon dioxide"),
                                  ("Question: Which gas do plants take in from the air?\nAnswer:", " helium")])
    assert ll[0][0] > ll[1][0]
