"""Training a mixture on tiny heterogeneous experts: only the router and the
interaction layers change, the checkpoint holds only them and round-trips,
an interrupted run resumes to the same weights, bad inputs are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from collab.errors import CollabError, Interrupted
from collab.latent.train import LatentTrainConfig, train_latent
from collab.system import GenerationRequest
from tests.latent.conftest import weights_digest

SMALL = dict(encoder="ngram", stacks=2, latent_dim=16, heads=2, router_hidden=16, steps=6, batch_size=4, examples=16, checkpoint_every=2, lr=5e-2, router_lr=5e-2)


def test_training_changes_only_the_router_and_the_interaction_layers(tmp_path: Path, mot_experts: list[Any], data_file: Path) -> None:
    from safetensors.torch import load_file

    from collab.latent.artefact import load_mixture

    before = [weights_digest(e) for e in mot_experts]
    flags = [[p.requires_grad for p in e.model.parameters()] for e in mot_experts]
    out = train_latent(mot_experts, str(data_file), tmp_path / "mot", LatentTrainConfig(**SMALL))
    assert [weights_digest(e) for e in mot_experts] == before  # bit-identical
    assert [[p.requires_grad for p in e.model.parameters()] for e in mot_experts] == flags  # restored
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights.safetensors"]
    tensors = load_file(str(out / "weights.safetensors"))
    assert {k.split(".")[0] for k in tensors} == {"router", "interactions"}  # nothing of the experts
    _, interactions, cfg = load_mixture(out)
    gates = [abs(float(layer.gate.detach())) for per in interactions.layers for layer in per]
    assert max(gates) > 0  # the interaction layers did train
    m = cfg.metrics
    assert m["trainable_parameters"] == sum(t.numel() for t in tensors.values())
    assert m["trainable_share"] == pytest.approx(m["trainable_parameters"] / m["expert_parameters"], rel=1e-3)
    assert len(m["losses"]) == 6 and set(m["losses"][0]) == {"loss", "lm", "router", "balance"}
    assert not (tmp_path / ".mot.checkpoint").exists()


def test_artefact_round_trips_into_a_working_system(tmp_path: Path, mot_experts: list[Any], data_file: Path) -> None:
    from collab.latent.artefact import load_mixture, read_config
    from collab.latent.system import MixtureOfThoughts

    out = train_latent(mot_experts[:2], str(data_file), tmp_path / "mot", LatentTrainConfig(**SMALL))
    cfg = read_config(out)
    assert cfg.type == "mot" and cfg.version == 1 and cfg.top_k == 2 and cfg.stacks == 2
    assert [(e["name"], e["hidden_size"], e["layers"], e["cuts"]) for e in cfg.experts] == [("llama", 32, 2, [1, 2]), ("qwen", 48, 3, [1, 3])]
    assert cfg.encoder == {"type": "ngram", "dim": 256} and cfg.data["examples"] == 16
    router, interactions, _ = load_mixture(out)
    mix = MixtureOfThoughts(mot_experts[:2], router, interactions, cfg)
    again = MixtureOfThoughts.load(out, mot_experts[:2])
    for a, b in zip(mix.interactions.state_dict().values(), again.interactions.state_dict().values()):
        assert torch.equal(a, b)
    req = GenerationRequest.chat("What is 3 + 3?", max_tokens=8)
    assert mix.generate(req).text == again.generate(req).text
    with pytest.raises(CollabError, match="already exists"):
        train_latent(mot_experts[:2], str(data_file), tmp_path / "mot", LatentTrainConfig(**SMALL))
    with pytest.raises(CollabError, match="trained with 2 experts"):
        MixtureOfThoughts.load(out, mot_experts)
    with pytest.raises(CollabError, match="expert 1 'llama2' has hidden size 40 and 3 layers"):
        MixtureOfThoughts.load(out, [mot_experts[0], mot_experts[2]])


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, mot_experts: list[Any], data_file: Path) -> None:
    from safetensors.torch import load_file

    cfg = LatentTrainConfig(**SMALL)
    whole = train_latent(mot_experts[:2], str(data_file), tmp_path / "whole", cfg)
    ckpt = tmp_path / ".resumed.checkpoint"
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        train_latent(mot_experts[:2], str(data_file), tmp_path / "resumed", cfg, stop_after=3)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert (ckpt / "scores.safetensors").is_file()
    resumed = train_latent(mot_experts[:2], str(data_file), tmp_path / "resumed", cfg)
    a, b = (load_file(str(p / "weights.safetensors")) for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    w, r = (json.loads((p / "config.json").read_text())["metrics"]["losses"] for p in (whole, resumed))
    assert w == r
    with pytest.raises(Interrupted):
        train_latent(mot_experts[:2], str(data_file), tmp_path / "other", cfg, stop_after=1)
    with pytest.raises(CollabError, match="checkpoint of a run with other settings"):
        train_latent(mot_experts[:2], str(data_file), tmp_path / "other", LatentTrainConfig(**{**SMALL, "steps": 7}))


def test_the_router_learns_which_expert_answers_best(tmp_path: Path, mot_experts: list[Any], data_file: Path) -> None:
    """Router loss: its argmax moves to the expert with the lowest answer NLL."""
    cfg = LatentTrainConfig(**{**SMALL, "top_k": 1, "steps": 40, "router_lr": 1e-2, "balance_weight": 0.0})
    out = train_latent(mot_experts[:2], str(data_file), tmp_path / "mot", cfg)
    m = json.loads((out / "config.json").read_text())["metrics"]
    assert m["router_oracle_agreement"] >= 0.75
    assert m["losses"][-1]["router"] < m["losses"][0]["router"]


def test_joint_training_lowers_the_mixtures_lm_loss(tmp_path: Path, mot_experts: list[Any], data_file: Path) -> None:
    cfg = LatentTrainConfig(**{**SMALL, "steps": 30, "batch_size": 8, "examples": 8, "router_weight": 0.0, "balance_weight": 0.0})
    out = train_latent(mot_experts[:2], str(data_file), tmp_path / "mot", cfg)
    lm = [x["lm"] for x in json.loads((out / "config.json").read_text())["metrics"]["losses"]]
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5  # the same 8 conversations every step: the cross-attention fits them


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 4}, "--top-k: expected at most 3"),
        ({"stacks": 0}, "--stacks: expected an integer >= 1"),
        ({"stacks": 3}, "--stacks: expert 'llama' has 2 layers"),
        ({"latent_dim": 10, "heads": 4}, "--latent-dim: 10 is not divisible by --heads 4"),
        ({"encoder": "bert"}, "encoder: expected one of minilm, ngram"),
        ({"lr": 0.0}, "--lr: expected a positive number"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, mot_experts: list[Any], data_file: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(CollabError, match=message):
        train_latent(mot_experts, str(data_file), tmp_path / "mot", LatentTrainConfig(**{**SMALL, **change}))


def test_data_files_are_checked_naming_file_and_line(tmp_path: Path) -> None:
    from collab.latent.data import LatentDataError, load_conversations

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(LatentDataError, match=r"bad.jsonl:2: response: expected a non-empty string"):
        load_conversations(str(bad))
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n')
    with pytest.raises(LatentDataError, match="must be the assistant's"):
        load_conversations(str(bad))
    with pytest.raises(LatentDataError, match="training data not found"):
        load_conversations(str(tmp_path / "missing.jsonl"))
    mixed = load_conversations("skill:mixed", 6)
    assert len(mixed.items) == 6 and mixed.queries()[0].startswith("user: ")


def test_each_expert_tokenises_in_its_own_format(mot_experts: list[Any], data_file: Path) -> None:
    from collab.latent.data import load_conversations

    convs = load_conversations(str(data_file), 2)
    llama, qwen = mot_experts[0], mot_experts[1]
    (p1, a1), (p2, a2) = convs.tokenize(llama, 96, 48)[0], convs.tokenize(qwen, 96, 48)[0]
    assert "<|im_start|>assistant" in llama.tokenizer.decode(p1) and qwen.tokenizer.decode(p2).endswith("Assistant:")
    assert a1[-1] == llama.tokenizer.eos_token_id and a2[-1] == qwen.tokenizer.eos_token_id
    assert llama.tokenizer.decode(a1[:-1]) == "It is 0." and qwen.tokenizer.decode(a2[:-1]) == " It is 0."
    short = convs.tokenize(llama, 4, 3)[0]
    assert len(short[0]) == 4 and len(short[1]) == 3


def test_raw_context_continuation_rows_train_as_scoring_splits_them(tmp_path: Path, mot_experts: list[Any]) -> None:
    """Multiple-choice training rows: no chat template, the split loglikelihood scoring uses, no end of sequence."""
    from collab.latent.data import load_conversations

    path = tmp_path / "mc.jsonl"
    rows = [{"context": f"Question: What is {a} + {a}?\nAnswer:", "continuation": f" {2 * a}"} for a in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs = load_conversations(str(path))
    assert convs.queries()[0] == rows[0]["context"]
    for e in mot_experts[:2]:
        ctx, cont = e._split_context(rows[1]["context"], rows[1]["continuation"])
        assert convs.tokenize(e, 96, 48)[1] == (ctx, cont)
    out = train_latent(mot_experts[:2], str(path), tmp_path / "mot", LatentTrainConfig(**SMALL))
    assert json.loads((out / "config.json").read_text())["data"]["examples"] == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a"}\n')
    with pytest.raises(CollabError, match=r"bad.jsonl:1: continuation: expected a non-empty string"):
        load_conversations(str(bad))


def test_scoring_gives_each_experts_own_log_likelihood(mot_experts: list[Any]) -> None:
    """The router's targets: -log P(answer) of each expert alone, as Expert.loglikelihood gives it."""
    from collab.latent.data import Conversation, load_conversations
    from collab.latent.train import score_experts

    pairs = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("Reverse the list [1, 2]:", " [2, 1] and then some more words")]
    convs = load_conversations([Conversation((("user", c),), x, raw=True) for c, x in pairs])
    experts = mot_experts[:2]
    nll = score_experts(experts, [convs.tokenize(e, 96, 48) for e in experts], batch_size=2)
    for m, e in enumerate(experts):
        want = [-ll for ll, _ in e.loglikelihood_batch(pairs, share_context=False)]
        assert nll[:, m].tolist() == pytest.approx(want, abs=1e-4)


def test_training_asks_transformers_for_nothing_deprecated(tmp_path: Path, mot_experts: list[Any], data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole-row passes without a KV cache (scoring, the primary's loss) must not
    ask the output for its cache by the old name: transformers warns once per process."""
    from transformers.utils import generic

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(str(msg)))
    train_latent(mot_experts[:2], str(data_file), tmp_path / "mot", LatentTrainConfig(**{**SMALL, "steps": 2, "examples": 8}))
    assert not [m for m in said if "deprecated" in m], said
