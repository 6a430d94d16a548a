"""Training a deferral head on tiny models: what the artefact holds, what training
may change (the head, the base's LoRA when asked) and may not (the assistants, the
base expert), resumption to the same weights, data files and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from collab.errors import CollabError, Interrupted
from decoding.train import TrainConfig, train_colm

SMALL = dict(steps=8, init_steps=4, examples=24, batch_size=6, checkpoint_every=3)


def weights_digest(expert: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(expert.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"What is {a} + {a}?", "response": f"It is {2 * a}."} for a in range(12)]
    rows += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Reverse {a} {a + 1}."}, {"role": "assistant", "content": f"{a + 1} {a}"}]} for a in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_artefact_holds_the_head_and_a_config_naming_the_experts(tmp_path: Path, tiny_expert: Any, assistants: list[Any], data_file: Path) -> None:
    from decoding.artefact import load_head
    from decoding.data import load_data
    from decoding.system import CoLLMDecoder

    out = train_colm(tiny_expert, assistants, str(data_file), tmp_path / "head", TrainConfig(**SMALL))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "head.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["type"] == "colm-head" and cfg["version"] == 1
    assert cfg["base"] == {"name": "tiny", "ref": str(tiny_expert.ref)}
    assert [a["name"] for a in cfg["assistants"]] == ["asst0", "asst1"]
    assert cfg["data"]["sha256"] == load_data(str(data_file), 24).sha256 and cfg["data"]["examples"] == 24
    assert cfg["training"]["steps"] == 8 and cfg["training"]["pos_weight"] == 8.0 and cfg["train_base"] == "none"
    assert len(cfg["metrics"]["losses"]["init"]) == 4 and len(cfg["metrics"]["losses"]["marginal"]) == 8
    head, hc, adapter = load_head(out)
    assert head.weight.shape == (2, 32) and adapter is None and hc.n_assistants == 2
    d = CoLLMDecoder.load(out, tiny_expert, assistants, 0.5)
    assert d.generate_batch  # loads into a working system
    assert not (tmp_path / ".head.checkpoint").exists()  # the checkpoint is removed once the head is written
    with pytest.raises(CollabError, match="already exists"):
        train_colm(tiny_expert, assistants, str(data_file), tmp_path / "head", TrainConfig(**SMALL))


@pytest.mark.parametrize("train_base", ["none", "lora"])
def test_training_changes_neither_the_assistants_nor_the_base_expert(tmp_path: Path, tiny_expert: Any, assistants: list[Any], data_file: Path, train_base: str) -> None:
    before = [weights_digest(e) for e in (tiny_expert, *assistants)]
    train_colm(tiny_expert, assistants, str(data_file), tmp_path / "head", TrainConfig(**SMALL, train_base=train_base))
    assert [weights_digest(e) for e in (tiny_expert, *assistants)] == before  # bit-identical


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_head_decodes_with_the_adapted_base(tmp_path: Path, tiny_expert: Any, assistants: list[Any], data_file: Path) -> None:
    from peft import PeftModel

    from collab.experts import Expert
    from collab.system import GenerationRequest
    from decoding.system import CoLLMDecoder
    from tests.decoding.test_system import greedy_ids, trace_ids

    out = train_colm(tiny_expert, assistants[:1], str(data_file), tmp_path / "head", TrainConfig(**SMALL, train_base="lora", lora_lr=2e-2))
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_expert.ref)
    d = CoLLMDecoder.load(out, tiny_expert, assistants[:1], threshold=1.0)
    assert d.base is not tiny_expert and d.base.model is not tiny_expert.model
    adapted = Expert(PeftModel.from_pretrained(Expert.load(tiny_expert.ref).model, str(out / "adapter")).merge_and_unload(), tiny_expert.tokenizer, name="adapted")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(adapted.forward(ids).logits, tiny_expert.forward(ids).logits)  # the LoRA did train
    for prompt in ("What is 3 + 3?", "Reverse 4 5."):
        req = GenerationRequest.chat(prompt, max_tokens=12)
        assert trace_ids(d.generate(req)) == greedy_ids(adapted, req)  # never deferring = the adapted base


@pytest.mark.parametrize("train_base", ["none", "lora"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, tiny_expert: Any, assistants: list[Any], data_file: Path, train_base: str) -> None:
    from safetensors.torch import load_file

    cfg = TrainConfig(**SMALL, train_base=train_base)
    whole = train_colm(tiny_expert, assistants, str(data_file), tmp_path / "whole", cfg)
    ckpt = tmp_path / ".resumed.checkpoint"
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        train_colm(tiny_expert, assistants, str(data_file), tmp_path / "resumed", cfg, stop_after=2)  # inside weak supervision
    assert json.loads((ckpt / "state.json").read_text())["stage"] == "init"
    with pytest.raises(Interrupted):
        train_colm(tiny_expert, assistants, str(data_file), tmp_path / "resumed", cfg, stop_after=5)  # inside the marginal stage
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["stage"], state["step"]) == ("marginal", 3)
    resumed = train_colm(tiny_expert, assistants, str(data_file), tmp_path / "resumed", cfg)
    assert torch.equal(load_file(str(whole / "head.safetensors"))["weight"], load_file(str(resumed / "head.safetensors"))["weight"])
    if train_base == "lora":
        a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    w, r = (json.loads((p / "config.json").read_text())["metrics"]["losses"] for p in (whole, resumed))
    assert w == r


def test_a_checkpoint_of_other_settings_is_refused(tmp_path: Path, tiny_expert: Any, assistants: list[Any], data_file: Path) -> None:
    with pytest.raises(Interrupted):
        train_colm(tiny_expert, assistants, str(data_file), tmp_path / "h", TrainConfig(**SMALL), stop_after=2)
    with pytest.raises(CollabError, match="checkpoint of a run with other settings"):
        train_colm(tiny_expert, assistants, str(data_file), tmp_path / "h", TrainConfig(**{**SMALL, "steps": 9}))


@pytest.mark.parametrize("train_base", ["none", "lora"])
def test_training_fits_the_weak_labels_and_lowers_the_marginal_loss(tmp_path: Path, tiny_expert: Any, assistants: list[Any], train_base: str) -> None:
    """On answers that assistant 0 writes, the head learns to defer to it where the base is wrong."""
    from collab import decode
    from collab.system import GenerationRequest
    from decoding.artefact import load_head
    from decoding.data import Conversation, TrainingData
    from decoding.features import score_data
    from decoding.head import deferral_probability, weak_labels

    convs = []
    for a in range(24):
        q = f"What is {a} + {a}?"
        convs.append(Conversation((("user", q),), decode.generate(assistants[0], GenerationRequest.chat(q, max_tokens=6)).text))
    data = TrainingData("written-by-asst0", convs)
    cfg = TrainConfig(steps=40, init_steps=40, examples=24, batch_size=8, lr=1e-2, init_lr=1e-2, train_base=train_base)
    init_only = train_colm(tiny_expert, assistants[:1], data, tmp_path / "init-only", dataclasses.replace(cfg, steps=0))
    out = train_colm(tiny_expert, assistants[:1], data, tmp_path / "head", cfg)
    m = json.loads((out / "config.json").read_text())["metrics"]
    losses = m["losses"]
    assert losses["init"][-1] < losses["init"][0] and losses["marginal"][-1] < losses["marginal"][0]
    assert min(losses["marginal"]) > 0  # negative log-likelihoods, going down
    if train_base == "lora":
        return  # the metrics below read the frozen base's states, which the LoRA does not change
    # the marginal stage lowers the marginal NLL below where weak supervision left it,
    # and co-decoding explains the data better than the base alone
    assert m["nll_marginal"] < json.loads((init_only / "config.json").read_text())["metrics"]["nll_marginal"]
    assert m["nll_marginal"] < m["nll_per_token"]["tiny"]
    head, _, _ = load_head(out)
    f = score_data(tiny_expert, assistants[:1], data.tokenize(tiny_expert))
    labels = weak_labels(f.hits[:, 0], f.hits[:, 1:], f.log_probs[:, 1:])
    g = deferral_probability(head.log_probs(f.hidden)).detach()
    assert labels.sum() > 0 and float(g[labels == 1].mean()) > float(g[labels == 0].mean())


def test_data_files_are_checked_naming_file_and_line(tmp_path: Path) -> None:
    from decoding.data import DataError, load_data

    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"prompt": "hi"}', "bad.jsonl:1: response: expected a non-empty string"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "bad.jsonl:1: messages: the last turn is the answer"),
        ('{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}', "bad.jsonl:1: messages[0]: expected"),
        ("not json", "bad.jsonl:1: not valid JSON"),
    ]
    for text, message in cases:
        bad.write_text(text + "\n")
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_data(str(bad))
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown skill"):
        load_data("skill:poetry")
    mixed = load_data("skill:mixed", 6)
    from collab import skills

    assert [c.messages[0][1] for c in mixed.conversations[:3]] == [skills.generate(s, 1, skills.TRAIN_SEED)[0].question for s in skills.SKILLS]


def test_cli_trains_a_head(tmp_path: Path, tiny_model_dir: Path, assistant_dirs: list[Path], data_file: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from decoding.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    out = tmp_path / "head"
    args = ["decode", "train", "--base", str(tiny_model_dir), "--assistant", f"{assistant_dirs[0]},{assistant_dirs[1]}", "--data", str(data_file),
            "--out", str(out), "--steps", "3", "--init-steps", "2", "--examples", "8", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"-> {out}" in res.output and "weak labels:" in res.output
    assert len(json.loads((out / "config.json").read_text())["assistants"]) == 2
    res = CliRunner().invoke(app, [*args[:-1], "--train-base", "full", "--overwrite", "-q"])
    assert isinstance(res.exception, CollabError) and "--train-base: expected 'none' or 'lora'" in str(res.exception)
