"""The invariants of the interaction layers on tiny heterogeneous experts (a Llama
and a Qwen2 of other widths, depths and tokenizers): zero gates leave the primary
exactly as it is, cached decoding equals recomputing everything, K = 1 is routing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collab.system import GenerationRequest
from tests.latent.conftest import make_mixture

PROMPTS = ["What is 2 + 2?", "Reverse the list [1, 2, 3].", "The capital of France is"]


def _memory(mix: Any, primary: int, prompts: list[str]) -> Any:
    """The memory of ``prompts`` with every other expert (up to K - 1) as a peer, each in its own tokens."""
    from collab.latent.model import build_memory

    peers = [j for j in range(len(mix.experts)) if j != primary][: mix.top_k - 1]
    rows = [[(j, 0.5, mix.experts[j].encode(GenerationRequest.chat(p))) for j in peers] for p in prompts]
    return build_memory(mix.interactions, mix.experts, rows)


def test_cut_points_spread_the_stacks_through_each_experts_depth() -> None:
    from collab.errors import CollabError
    from collab.latent.model import cut_points

    assert cut_points(30, 4) == [7, 15, 22, 30]  # SmolLM2-135M
    assert cut_points(18, 4) == [4, 9, 13, 18]  # Gemma-3-270M
    assert cut_points(3, 1) == [3]
    with pytest.raises(CollabError, match="stacks: expected 1 <= Q <= 2"):
        cut_points(2, 3)


@pytest.mark.parametrize("primary", [0, 1])
def test_zero_gates_leave_the_primarys_logits_exactly_as_they_are(mot_experts: list[Any], primary: int) -> None:
    from collab.latent.model import left_pad, primary_logits

    experts = mot_experts[:2]
    mix = make_mixture(experts, gate=0.0)
    expert = experts[primary]
    rows = [expert.encode(GenerationRequest.chat(p)) for p in PROMPTS]
    memory = _memory(mix, primary, PROMPTS)
    with torch.inference_mode():
        mixed = primary_logits(expert, mix.interactions, primary, rows, memory, grad=False, keep=max(map(len, rows)))
        ids, mask, pos = left_pad(rows, expert.tokenizer.pad_token_id)
        alone = expert.forward(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert torch.equal(mixed, alone)
    # the same with the gates open differs, so the equality above is not vacuous
    open_ = make_mixture(experts, gate=1.0)
    with torch.inference_mode():
        changed = primary_logits(expert, open_.interactions, primary, rows, _memory(open_, primary, PROMPTS), grad=False, keep=4)
    assert not torch.allclose(changed, alone[:, -4:], atol=1e-3)
    # and no hook is left behind on the shared expert
    with torch.inference_mode():
        assert torch.equal(expert.forward(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits, alone)


@pytest.mark.parametrize("favour", [0, 1])
def test_an_untrained_mixture_answers_and_scores_as_its_primary(mot_experts: list[Any], favour: int) -> None:
    experts = mot_experts[:2]
    mix = make_mixture(experts, gate=0.0, favour=favour)
    for p in PROMPTS:
        req = GenerationRequest.chat(p, max_tokens=12)
        c = mix.generate(req)
        assert c.text == experts[favour].generate(req).text
        assert c.trace["primary"] == experts[favour].name and c.trace["experts"][0] == experts[favour].name
    pairs = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("Question: What is 2 + 2?\nAnswer:", " 5"), ("The capital of France is", " Paris")]
    got = mix.loglikelihood_batch(pairs)
    want = experts[favour].loglikelihood_batch(pairs, share_context=False)
    assert [g for _, g in got] == [g for _, g in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)


@pytest.mark.parametrize("primary", [0, 1])
def test_cached_decoding_equals_full_recomputation(mot_experts: list[Any], primary: int) -> None:
    """The primary's KV-cached steps with interactions attached give the logits that a
    pass over the whole sequence gives, row by row in a left-padded batch."""
    from collab.decode import Session
    from collab.latent.model import primary_logits
    from collab.latent.system import AttachedPrimary

    experts = mot_experts[:2]
    mix = make_mixture(experts, gate=1.0, seed=3)
    expert = experts[primary]
    prompts = [expert.encode(GenerationRequest.chat(p)) for p in PROMPTS[:2]]
    memory = _memory(mix, primary, PROMPTS[:2])
    with torch.inference_mode():
        session = Session(AttachedPrimary(expert, mix.interactions, primary, memory), prompts)
        seqs = [list(p) for p in prompts]
        for _ in range(5):
            nxt = session.logits.argmax(dim=-1).tolist()
            full = primary_logits(expert, mix.interactions, primary, seqs, memory, grad=False, keep=1)[:, -1]
            torch.testing.assert_close(session.logits, full.float(), atol=1e-4, rtol=1e-4)
            for s, t in zip(seqs, nxt):
                s.append(t)
            session.feed(nxt)


def test_generation_equals_a_loop_that_recomputes_everything(mot_experts: list[Any]) -> None:
    from collab.latent.model import primary_logits

    experts = mot_experts[:2]
    mix = make_mixture(experts, gate=1.5, seed=5)
    for p in PROMPTS:
        req = GenerationRequest.chat(p, max_tokens=10)
        c = mix.generate(req)
        routing = mix.route([req.text_for_routing()])[0]
        m = routing.primary
        expert = experts[m]
        memory = mix._memory([routing], [[experts[j].encode(req) for j, _ in routing.peers]])
        seq = expert.encode(req)
        gen: list[int] = []
        with torch.inference_mode():
            for _ in range(10):
                t = int(primary_logits(expert, mix.interactions, m, [seq + gen], memory, grad=False, keep=1)[0, -1].argmax())
                if t in expert.eos_token_ids:
                    break
                gen.append(t)
        assert c.text == expert.tokenizer.decode(gen, skip_special_tokens=True)
        assert c.usage.completion_tokens == len(gen) + (len(gen) < 10)


@pytest.mark.parametrize("favour", [0, 1, 2])
def test_top_k_1_equals_routing_to_the_chosen_expert(mot_experts: list[Any], favour: int) -> None:
    mix = make_mixture(mot_experts, gate=2.0, top_k=1, favour=favour)  # open gates: unused at K = 1
    for p in PROMPTS:
        req = GenerationRequest.chat(p, max_tokens=12)
        c = mix.generate(req)
        assert c.text == mot_experts[favour].generate(req).text
        assert c.trace["experts"] == [mot_experts[favour].name]


def test_top_k_1_follows_the_routers_argmax(mot_experts: list[Any]) -> None:
    mix = make_mixture(mot_experts, gate=2.0, top_k=1, seed=11)
    seen = set()
    for p in PROMPTS + ["Convert 3 km to m.", "def add(a, b):", "Hello there!"]:
        req = GenerationRequest.chat(p, max_tokens=8)
        routing = mix.route([req.text_for_routing()])[0]
        best = max(range(3), key=lambda m: routing.scores[m])
        c = mix.generate(req)
        assert c.trace["primary"] == mot_experts[best].name
        assert c.text == mot_experts[best].generate(req).text
        seen.add(best)
    assert seen  # routed somewhere for every prompt


def test_trace_names_the_active_experts_primary_and_scores(mot_experts: list[Any]) -> None:
    mix = make_mixture(mot_experts, gate=1.0, top_k=2, seed=2)
    c = mix.generate(GenerationRequest.chat("What is 2 + 2?", max_tokens=6))
    t = c.trace
    assert t["system"] == "mot" and t["type"] == "latent" and t["top_k"] == 2
    assert len(t["experts"]) == 2 and t["primary"] == t["experts"][0]
    assert set(t["router_scores"]) == {"llama", "qwen", "llama2"}
    assert max(t["router_scores"], key=t["router_scores"].get) == t["primary"]
    assert sum(t["weights"].values()) == pytest.approx(1.0, abs=1e-5)
