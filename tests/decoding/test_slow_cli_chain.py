"""Co-LLM from the command line on the real zoo models, as a user runs it: `collab
decode train` (a few steps), `collab decode tune`, `collab eval` of the spec's
co-decoder, then `collab serve` of the same spec answering the official client
with the per-token trace. Slow: about three minutes on two CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import yaml
from typer.testing import CliRunner

from collab.cli import app
from collab.system import GenerationRequest
from tests.server.helpers import ServeProcess

pytestmark = pytest.mark.slow


def _ok(result: object) -> str:
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    return result.output  # type: ignore[attr-defined]


def test_train_tune_eval_serve_a_co_decoder(tmp_path: Path) -> None:
    runner = CliRunner()
    head, tune = tmp_path / "head", tmp_path / "tune"
    _ok(runner.invoke(app, [
        "decode", "train", "--base", "zoo:smollm2-135m-instruct", "--assistant", "zoo:smol-arith", "--data", "skill:arith",
        "--examples", "8", "--init-steps", "3", "--steps", "2", "--batch-size", "4", "--train-base", "lora", "--out", str(head), "--quiet",
    ]))
    config = json.loads((head / "config.json").read_text())
    assert [a["ref"] for a in config["assistants"]] == ["zoo:smol-arith"] and config["train_base"] == "lora"
    assert sorted(p.name for p in head.glob("*.safetensors"))  # only what was trained, no pickles
    assert not list(head.rglob("*.bin")) and not list(head.rglob("*.pt"))

    out = _ok(runner.invoke(app, ["decode", "tune", "--head", str(head), "--data", "dev:arith", "--limit", "3", "--rates", "0,1", "--out", str(tune), "--quiet"]))
    curve = json.loads((tune / "curve.json").read_text())
    assert [p["target_rate"] for p in curve["points"]] == [0.0, 1.0] and (tune / "curve.png").is_file()
    assert curve["points"][0]["deferral_rate"] == 0.0 and curve["points"][1]["deferral_rate"] == 1.0
    threshold = curve["chosen"]["threshold"]
    assert f"threshold: {threshold:.4g}" in out

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "experts": {"smol": {"ref": "zoo:smollm2-135m-instruct"}, "arith": {"ref": "zoo:smol-arith"}},
        "systems": {"duo": {"type": "codecode", "base": "smol", "assistant": "arith", "head": str(head), "threshold": threshold}},
    }))
    _ok(runner.invoke(app, ["eval", str(spec), "--system", "duo", "--bench", "skill:arith", "--limit", "3", "--out", str(tmp_path / "run"), "--quiet"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert r["trace"]["type"] == "codecode" and sum(r["trace"]["tokens_by_expert"].values()) == len(r["trace"]["tokens"])

    ask = [{"role": "user", "content": "What is 17 + 26?"}]
    from collab.spec import load_spec

    expected = load_spec(spec).system("duo").generate(GenerationRequest(messages=ask, max_tokens=16))
    with ServeProcess(str(spec), env={"OMP_NUM_THREADS": "2"}) as srv:
        srv.wait_ready(timeout=600)
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list()} == {"smol", "arith", "duo"}
        r = client.chat.completions.create(model="duo", messages=ask, max_tokens=16)
        assert r.choices[0].message.content == expected.text
        trace = r.model_extra["collab"]
        assert trace["type"] == "codecode" and [t["by"] for t in trace["tokens"]] == [t["by"] for t in expected.trace["tokens"]]
        streamed = client.chat.completions.create(model="duo", messages=ask, max_tokens=16, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
