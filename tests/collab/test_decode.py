"""The decoding loop: sessions (prefill, step, catch-up, crop, gradients, hidden
states) against plain full forward passes, and the loop's rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from collab import decode
from collab.decode import Sampler, Session
from collab.experts import Expert
from collab.system import GenerationRequest


def full_logits(expert: Expert, ids: list[int]) -> torch.Tensor:
    """Logits after every token of ``ids``, one unpadded forward pass without a cache."""
    with torch.inference_mode():
        return expert.model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.fixture
def prompts(tiny_expert: Any) -> list[list[int]]:
    tok = tiny_expert.tokenizer
    return [tok("The capital of France is").input_ids, tok("What is 2 + 2? It").input_ids]


def test_prefill_of_left_padded_rows_equals_each_row_alone(tiny_expert: Any, prompts: list[list[int]]) -> None:
    assert len(prompts[0]) != len(prompts[1])
    s = Session(tiny_expert, prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(s.logits[i], full_logits(tiny_expert, p)[-1], atol=1e-4, rtol=1e-4)
    assert s.lengths == [len(p) for p in prompts]


def test_one_token_steps_equal_full_forward(tiny_expert: Any, prompts: list[list[int]]) -> None:
    s = Session(tiny_expert, prompts)
    seqs = [list(p) for p in prompts]
    for _ in range(3):
        nxt = s.logits.argmax(-1).tolist()
        s.feed(nxt)
        for i, t in enumerate(nxt):
            seqs[i].append(t)
            torch.testing.assert_close(s.logits[i], full_logits(tiny_expert, seqs[i])[-1], atol=1e-4, rtol=1e-4)


def test_ragged_catch_up_in_one_pass(tiny_expert: Any, prompts: list[list[int]]) -> None:
    s = Session(tiny_expert, prompts)
    chunks = [[5, 17, 23], [42]]
    s.feed(chunks, all_logits=True)
    assert s.chunk_logits is not None and s.chunk_logits.shape[:2] == (2, 3)
    for i, (p, c) in enumerate(zip(prompts, chunks)):
        ref = full_logits(tiny_expert, p + c)
        torch.testing.assert_close(s.logits[i], ref[-1], atol=1e-4, rtol=1e-4)
        # right-aligned: the row's len(c) tokens are its last columns
        torch.testing.assert_close(s.chunk_logits[i, -len(c) :].float(), ref[-len(c) :], atol=1e-4, rtol=1e-4)
    # a row fed nothing keeps its logits while the other advances
    before = s.logits[1].clone()
    s.feed([[7], []])
    torch.testing.assert_close(s.logits[1], before)
    torch.testing.assert_close(s.logits[0], full_logits(tiny_expert, prompts[0] + chunks[0] + [7])[-1], atol=1e-4, rtol=1e-4)
    assert s.lengths == [len(prompts[0]) + 4, len(prompts[1]) + 1]


def test_crop_forgets_rejected_tokens(tiny_expert: Any, prompts: list[list[int]]) -> None:
    p = prompts[0]
    s = Session(tiny_expert, [p])
    keep = s.mask.shape[1]
    s.feed([[9, 10, 11]])
    s.crop(keep)
    assert s.lengths == [len(p)]
    s.feed([12])
    torch.testing.assert_close(s.logits[0], full_logits(tiny_expert, p + [12])[-1], atol=1e-4, rtol=1e-4)


def test_hidden_states_and_gradients(tiny_expert: Any, prompts: list[list[int]]) -> None:
    s = Session(tiny_expert, prompts[:1], hidden_states=True, grad=True)
    assert s.logits.requires_grad
    n_layers = tiny_expert.model.config.num_hidden_layers
    assert s.hidden is not None and len(s.hidden) == n_layers + 1
    with torch.inference_mode():
        ref = tiny_expert.model(input_ids=torch.tensor(prompts[:1]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(s.hidden[-1][0].detach(), ref[-1][0, -1], atol=1e-4, rtol=1e-4)
    s.logits[0].logsumexp(-1).backward()
    grads = [p.grad for p in tiny_expert.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    tiny_expert.model.zero_grad(set_to_none=True)


def test_loop_greedy_equals_transformers_generate(tiny_expert: Any) -> None:
    req = GenerationRequest.chat("Count from 1 to 30, separated by commas.", max_tokens=20)
    ids = tiny_expert.encode(req)
    with torch.inference_mode():
        out = tiny_expert.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=tiny_expert.tokenizer.pad_token_id,
            eos_token_id=tiny_expert.eos_token_ids,
        )
    hf = [t for t in out[0, len(ids) :].tolist() if t not in tiny_expert.eos_token_ids]
    c = tiny_expert.generate(req)
    assert c.usage.completion_tokens == len(hf)
    assert c.text == tiny_expert.tokenizer.decode(hf, skip_special_tokens=True)


def test_seeded_sample_is_the_same_alone_and_in_a_batch(tiny_expert: Any) -> None:
    reqs = [GenerationRequest.chat(q, max_tokens=12, temperature=1.0, seed=s) for q, s in (("Hello there!", 3), ("What is 12 * 3?", 4))]
    alone = [tiny_expert.generate(r).text for r in reqs]
    assert [c.text for c in decode.generate_batch(tiny_expert, reqs)] == alone
    assert tiny_expert.generate(GenerationRequest.chat("Hello there!", max_tokens=12, temperature=1.0, seed=5)).text != alone[0]


def test_sampler_top_p_keeps_the_nucleus() -> None:
    logits = torch.tensor([4.0, 3.9, -5.0, -6.0])
    picks = {Sampler(1.0, top_p=0.9, seed=s).sample(logits) for s in range(40)}
    assert picks == {0, 1}  # the two likely tokens hold > 99% of the mass; the tail is cut


class MeanOfTwo:
    """The guide's custom rule: greedy over the summed log-probabilities of the driving expert and a peer."""

    def __init__(self, peer: Expert) -> None:
        self.peer = peer
        self.picks: list[int] = []

    def start(self, loop: decode.Loop) -> None:
        self.session = self.peer.session(loop.prompts)

    def __call__(self, logits: torch.Tensor, loop: decode.Loop) -> torch.Tensor:
        if loop.last is not None:
            self.session.feed(loop.last)  # catch the peer up on the token chosen last step
        pick = (logits.log_softmax(-1) + self.session.logits.log_softmax(-1)).argmax(-1)
        self.picks.append(int(pick[0]))
        return pick

    def trace(self, row: int) -> dict[str, Any]:
        return {"peer": self.peer.name}


def test_custom_rule_over_two_experts(tiny_expert: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.tiny import make_tiny_model

    peer = Expert.load(make_tiny_model(tmp_path / "peer", seed=7), name="peer")
    req = GenerationRequest.chat("What is 2 + 2?", max_tokens=6)
    rule = MeanOfTwo(peer)
    c = decode.generate(tiny_expert, req, rule)
    assert c.trace["peer"] == "peer" and c.trace["expert"] == tiny_expert.name
    # the same choice, recomputed from full forward passes of both models
    seq = tiny_expert.encode(req)
    for pick in rule.picks:
        mixed = full_logits(tiny_expert, seq)[-1].log_softmax(-1) + full_logits(peer, seq)[-1].log_softmax(-1)
        assert int(mixed.argmax()) == pick
        seq.append(pick)
    alone = tiny_expert.generate(req)
    assert rule.picks != tiny_expert.tokenizer(alone.text, add_special_tokens=False).input_ids[: len(rule.picks)]


# ------------------------------------------------------ continuous batching
def test_rows_join_and_leave_a_running_session(tiny_expert: Any, prompts: list[list[int]]) -> None:
    s = Session(tiny_expert, prompts, hidden_states=True)
    assert s.can_extend
    seqs = [list(p) for p in prompts]
    for _ in range(2):
        nxt = s.logits.argmax(-1).tolist()
        s.feed(nxt)
        for q, t in zip(seqs, nxt):
            q.append(t)
    tok = tiny_expert.tokenizer
    late = [tok("A much longer prompt that arrives while the others are decoding, and is longer").input_ids, [7]]
    assert len(late[0]) > s.mask.shape[1]  # wider than the running rows: they are padded further left
    s.extend(late)
    seqs += [list(p) for p in late]
    assert s.batch == 4 and s.lengths == [len(q) for q in seqs] and len(s.hidden) == tiny_expert.model.config.num_hidden_layers + 1
    for i, q in enumerate(seqs):
        torch.testing.assert_close(s.logits[i], full_logits(tiny_expert, q)[-1], atol=1e-4, rtol=1e-4)
    s.keep([3, 1])  # the first row ends, the longest leaves; order as asked
    seqs = [seqs[3], seqs[1]]
    assert s.mask.shape[1] == max(len(q) for q in seqs)  # the columns only the dropped rows used are freed
    for _ in range(2):
        nxt = s.logits.argmax(-1).tolist()
        s.feed(nxt)
        for i, t in enumerate(nxt):
            seqs[i].append(t)
            torch.testing.assert_close(s.logits[i], full_logits(tiny_expert, seqs[i])[-1], atol=1e-4, rtol=1e-4)


def test_requests_admitted_mid_decode_answer_as_alone(tiny_expert: Any) -> None:
    reqs = [GenerationRequest(prompt=p, max_tokens=n) for p, n in
            [("The capital of France is", 3), ("Once upon a time", 9), ("2 + 2 =", 5), ("Hello there, my friend", 6), ("Why", 4)]]
    alone = [tiny_expert.generate(r) for r in reqs]
    waiting = [(r, tiny_expert.encode(r)) for r in reqs[2:]]
    steps_seen: list[int] = []

    def admit(loop: decode.Loop) -> list[tuple[GenerationRequest, list[int]]]:
        steps_seen.append(len(loop.rows))
        if loop.step in (2, 4) and waiting:  # one joins at step 2, two at step 4
            n = 1 if loop.step == 2 else 2
            joining, waiting[:] = waiting[:n], waiting[n:]
            return joining
        return []

    got: dict[int, Any] = {}
    for events in decode.decode(tiny_expert, reqs[:2], admit=admit):
        for e in events:
            if e.completion is not None:
                got[id(e.request)] = e.completion
    assert not waiting and len(got) == 5
    for r, a in zip(reqs, alone):
        c = got[id(r)]
        assert (c.text, c.finish_reason, c.usage.completion_tokens) == (a.text, a.finish_reason, a.usage.completion_tokens)
    assert len(steps_seen) >= 5 and steps_seen[-1] < 5  # called between every two steps; finished rows left


def test_admission_needs_a_rule_that_follows_rows(tiny_expert: Any) -> None:
    req = GenerationRequest(prompt="Hi", max_tokens=2)
    with pytest.raises(TypeError, match="admit"):
        next(decode.decode(tiny_expert, [req], decode.greedy, admit=lambda loop: []))
