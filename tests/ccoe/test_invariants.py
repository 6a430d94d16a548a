"""The invariants CCoE promises, pinned on tiny random Llamas:

- an untrained expert (the base's top layers copied) gives the base's logits;
- the shared backbone plus each row's branch equals each popped expert's own full
  forward pass, with padding and with the KV cache, in one mixed batch;
- a batch whose rows take different branches runs the backbone once per pass;
- with the true skill as the gate, CCoE answers as each popped expert does;
- pop then push gives the expert's tensors back bit for bit;
- training one expert leaves the base and every other expert bit-identical;
- an interrupted training run resumes to the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from collab.system import GenerationRequest
from tests.ccoe.conftest import ARITH, LISTS, PLAIN, QUICK, true_skill


def _batch(
    rows: list[list[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from collab.latent.model import left_pad

    return left_pad(rows, pad)


def _prompts(base: Any, texts: list[str]) -> list[list[int]]:
    return [base.encode(GenerationRequest.chat(t)) for t in texts]


@pytest.mark.parametrize("depth", [0, 2, 3])
def test_an_untrained_expert_gives_the_base_logits(base: Any, depth: int) -> None:
    from collab.ccoe.model import Branch, CCoEModel, copy_top_layers
    from collab.ccoe.system import BranchedRows
    from collab.decode import Session

    model = CCoEModel(
        base.model, [Branch("copy", depth, copy_top_layers(base.model, depth))]
    )
    ids, mask, pos = _batch(
        _prompts(base, ARITH[:2] + PLAIN[:1]), base.tokenizer.pad_token_id
    )
    with torch.inference_mode():
        ours = model.forward(
            ids, ["copy", "copy", None], attention_mask=mask, position_ids=pos
        ).logits
        theirs = base.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(ours, theirs)
    # decoding step by step with the KV cache: the same next-token logits at every step
    prompts = _prompts(base, LISTS[:2])
    a, b = (
        Session(BranchedRows(base, model, ["copy", "copy"]), prompts),
        Session(base, prompts),
    )
    for _ in range(4):
        assert torch.equal(a.logits, b.logits)
        nxt = b.logits.argmax(dim=-1)
        a.feed(nxt)
        b.feed(nxt)


def test_the_shared_backbone_and_branches_equal_separate_full_forwards(
    base: Any, experts: dict[str, Path], popped: dict[str, Any]
) -> None:
    from collab.ccoe.system import CCoESystem

    system = CCoESystem.load(base, experts, true_skill())
    assert {n: b.depth for n, b in system.ccoe.branches.items()} == {
        "arith": 2,
        "lists": 3,
    }  # two depths in one batch
    texts = [ARITH[0], LISTS[0], PLAIN[0], ARITH[1], LISTS[2]]
    branches = ["arith", "lists", None, "arith", "lists"]
    prompts = _prompts(base, texts)
    ids, mask, pos = _batch(prompts, base.tokenizer.pad_token_id)
    with torch.inference_mode():
        together = system.ccoe.forward(
            ids, branches, attention_mask=mask, position_ids=pos
        ).logits
        for r, b in enumerate(branches):
            alone = (
                (popped[b] if b else base)
                .model(
                    input_ids=ids[r : r + 1],
                    attention_mask=mask[r : r + 1],
                    position_ids=pos[r : r + 1],
                )
                .logits
            )
            n = len(prompts[r])
            torch.testing.assert_close(
                together[r, -n:], alone[0, -n:], rtol=1e-5, atol=1e-5
            )
    # the experts really differ from the base and from each other on these rows
    assert not torch.allclose(
        together[0, -1],
        base.model(
            input_ids=ids[:1], attention_mask=mask[:1], position_ids=pos[:1]
        ).logits[0, -1],
        atol=1e-3,
    )


def test_kv_cache_steps_equal_one_full_forward(
    base: Any, experts: dict[str, Path]
) -> None:
    from transformers import DynamicCache

    from collab.ccoe.system import CCoESystem

    system = CCoESystem.load(base, experts, true_skill())
    branches = ["lists", None, "arith"]
    ids, mask, pos = _batch(
        _prompts(base, [LISTS[1], PLAIN[1], ARITH[2]]), base.tokenizer.pad_token_id
    )
    cut = ids.shape[1] - 3
    with torch.inference_mode():
        full = system.ccoe.forward(
            ids, branches, attention_mask=mask, position_ids=pos
        ).logits
        cache = DynamicCache(config=base.model.config)
        system.ccoe.forward(
            ids[:, :cut],
            branches,
            attention_mask=mask[:, :cut],
            position_ids=pos[:, :cut],
            cache=cache,
        )
        steps = [
            system.ccoe.forward(
                ids[:, t : t + 1],
                branches,
                attention_mask=mask[:, : t + 1],
                position_ids=pos[:, t : t + 1],
                cache=cache,
            ).logits
            for t in range(cut, ids.shape[1])
        ]
    torch.testing.assert_close(
        torch.cat(steps, dim=1), full[:, cut:], rtol=1e-5, atol=1e-5
    )
    assert cache.get_seq_length() == ids.shape[1]


def test_a_mixed_batch_runs_the_backbone_once_per_pass(
    base: Any, experts: dict[str, Path]
) -> None:
    from collab.ccoe.system import CCoESystem
    from collab.embedding import decoder_parts

    system = CCoESystem.load(base, experts, true_skill())
    _, layers, norm = decoder_parts(base.model)
    calls = {"backbone": [], "passes": 0, "arith": [], "lists": [], "base top": []}
    hooks = [
        layers[0].register_forward_hook(
            lambda m, i, o: calls["backbone"].append(i[0].shape[0])
        ),
        norm.register_forward_hook(
            lambda m, i, o: calls.__setitem__("passes", calls["passes"] + 1)
        ),
        system.ccoe.branches["arith"]
        .layers[0]
        .register_forward_hook(lambda m, i, o: calls["arith"].append(i[0].shape[0])),
        system.ccoe.branches["lists"]
        .layers[0]
        .register_forward_hook(lambda m, i, o: calls["lists"].append(i[0].shape[0])),
        layers[3].register_forward_hook(
            lambda m, i, o: calls["base top"].append(i[0].shape[0])
        ),
    ]
    try:
        reqs = [
            GenerationRequest.chat(q, max_tokens=3)
            for q in (ARITH[0], LISTS[0], PLAIN[0], LISTS[1])
        ]
        system.generate_batch(reqs)
    finally:
        for h in hooks:
            h.remove()
    passes = calls["passes"]
    assert passes >= 2  # the prefill and at least one step
    assert calls["backbone"] == [4] * passes  # every row, once per pass
    assert (
        calls["arith"] == [1] * passes
        and calls["lists"] == [2] * passes
        and calls["base top"] == [1] * passes
    )


def test_the_true_skill_gate_answers_as_each_popped_expert(
    base: Any, experts: dict[str, Path], popped: dict[str, Any]
) -> None:
    from collab.ccoe.system import CCoESystem

    system = CCoESystem.load(base, experts, true_skill())
    texts = [ARITH[0], LISTS[0], ARITH[1], PLAIN[0], LISTS[2]]
    reqs = [GenerationRequest.chat(q, max_tokens=10) for q in texts]
    gate = true_skill()
    got = system.generate_batch(reqs)
    for req, c in zip(reqs, got):
        b = gate.of[req.messages[0]["content"]]
        own = (popped[b] if b else base).generate(req)
        assert c.text == own.text and c.usage == own.usage
        assert (
            c.trace["branch"] == (b or "base")
            and c.trace["gate"]["type"] == "true-skill"
        )
    assert {c.text for c in got[:2]} != {
        base.generate(r).text for r in reqs[:2]
    }  # the experts answer otherwise than the base
    pairs = [
        (f"Question: {ARITH[0]}\nAnswer:", " 42"),
        (f"Question: {LISTS[0]}\nAnswer:", " 1, 2, 3"),
    ]
    ll = CCoESystem.load(base, experts, _ContextGate()).loglikelihood_batch(pairs)
    want = [
        popped["arith"].loglikelihood_batch(pairs[:1], share_context=False)[0],
        popped["lists"].loglikelihood_batch(pairs[1:], share_context=False)[0],
    ]
    assert [g for _, g in ll] == [g for _, g in want]
    assert [x for x, _ in ll] == pytest.approx([x for x, _ in want], abs=1e-4)


class _ContextGate:
    """Routes a raw-prompt context by the question it contains."""

    def choose(self, requests: list[GenerationRequest]) -> list[Any]:
        from collab.ccoe.gate import GateDecision

        return [
            GateDecision(
                "arith" if any(q in (r.prompt or "") for q in ARITH) else "lists",
                {},
                "context",
            )
            for r in requests
        ]

    def describe(self) -> dict[str, Any]:
        return {"type": "context"}


def test_pop_then_push_is_bit_identical(
    base: Any, experts: dict[str, Path], ccoe_root: Path
) -> None:
    import json

    from safetensors.torch import load_file

    from collab.ccoe.standalone import pop_expert, push_expert

    for name, d in experts.items():
        layers = json.loads((d / "config.json").read_text())["layers"]
        model_dir = pop_expert(d, ccoe_root / f"roundtrip-{name}-model", base=base)
        back = push_expert(
            base, str(model_dir), layers, ccoe_root / f"roundtrip-{name}", name=name
        )
        a, b = (
            load_file(str(d / "branch.safetensors")),
            load_file(str(back / "branch.safetensors")),
        )
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        ca, cb = (json.loads((x / "config.json").read_text()) for x in (d, back))
        assert {k: ca[k] for k in ("name", "depth", "layers", "backbone_sha256")} == {
            k: cb[k] for k in ("name", "depth", "layers", "backbone_sha256")
        }


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_one_expert_leaves_the_backbone_and_every_other_expert_bit_identical(
    base: Any, experts: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from collab.ccoe.system import CCoESystem
    from collab.ccoe.train import CCoETrainConfig, train_expert

    system = CCoESystem.load(
        base, experts, true_skill()
    )  # a live system over the same base object
    before_base = _state(base.model)
    before_branches = {
        n: {k: v.clone() for k, v in b.tensors(system.ccoe.prefix).items()}
        for n, b in system.ccoe.branches.items()
    }
    before_files = {
        n: (d / "branch.safetensors").read_bytes() for n, d in experts.items()
    }
    flags = [p.requires_grad for p in base.model.parameters()]
    out = train_expert(
        base, "skill:units", tmp_path / "units", CCoETrainConfig(layers=3, **QUICK)
    )
    after = _state(base.model)
    assert sorted(after) == sorted(before_base) and all(
        torch.equal(before_base[k], after[k]) for k in after
    )
    for n, b in system.ccoe.branches.items():
        now = b.tensors(system.ccoe.prefix)
        assert all(torch.equal(before_branches[n][k], now[k]) for k in now)
    assert {
        n: (d / "branch.safetensors").read_bytes() for n, d in experts.items()
    } == before_files
    assert [p.requires_grad for p in base.model.parameters()] == flags
    trained = load_file(str(out / "branch.safetensors"))
    assert sorted({k.split(".")[2] for k in trained}) == [
        "1",
        "2",
        "3",
    ]  # only its own layers, under their full-model keys
    assert any(
        not torch.equal(trained[k], before_base[k]) for k in trained
    )  # and they did train


def test_an_interrupted_run_resumes_to_the_same_weights(
    base: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from collab.ccoe.train import CCoETrainConfig, train_expert
    from collab.errors import Interrupted

    cfg = CCoETrainConfig(layers=2, **QUICK)
    whole = train_expert(base, "skill:arith", tmp_path / "whole", cfg)
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        train_expert(base, "skill:arith", tmp_path / "resumed", cfg, stop_after=3)
    assert (tmp_path / ".resumed.checkpoint" / "state.json").is_file() and not (
        tmp_path / "resumed"
    ).exists()
    resumed = train_expert(base, "skill:arith", tmp_path / "resumed", cfg)
    assert not (tmp_path / ".resumed.checkpoint").exists()
    a, b = (
        load_file(str(whole / "branch.safetensors")),
        load_file(str(resumed / "branch.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_the_loss(base: Any, tmp_path: Path) -> None:
    import json

    from collab.ccoe.train import CCoETrainConfig, train_expert

    rows = tmp_path / "one.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"What is {a} + {a}?", "response": f"It is {2 * a}."})
            + "\n"
            for a in range(4)
        )
    )
    out = train_expert(
        base,
        str(rows),
        tmp_path / "e",
        CCoETrainConfig(layers=2, steps=12, batch_size=4, lr=3e-3, warmup_steps=1),
    )
    m = json.loads((out / "config.json").read_text())
    assert m["name"] == "one" and m["depth"] == 2 and m["data"]["examples"] == 4
    assert m["metrics"]["losses"][-1] < 0.5 * m["metrics"]["losses"][0]


def test_an_expert_of_another_base_is_refused(
    other_base_dir: Path, experts: dict[str, Path]
) -> None:
    from collab.ccoe.artefact import CCoEArtefactError
    from collab.ccoe.system import CCoESystem
    from collab.experts import Expert

    other = Expert.load(other_base_dir, name="other")
    with pytest.raises(CCoEArtefactError, match="trained on another backbone"):
        CCoESystem.load(other, experts, true_skill())


def test_ccoe_holds_one_backbone(
    base: Any, experts: dict[str, Path], popped: dict[str, Any]
) -> None:
    from collab.ccoe.model import parameter_bytes
    from collab.ccoe.system import CCoESystem

    held = CCoESystem.load(base, experts, true_skill()).parameter_bytes()
    separate = sum(parameter_bytes([e.model]) for e in popped.values())
    assert held["base"] == parameter_bytes([base.model])
    assert (
        held["total"] == held["base"] + held["arith"] + held["lists"] < separate
    )  # the base and two experts < two full models
    assert held["arith"] == 2 * held["lists"]  # 2 layers and 1 layer of the same shape
