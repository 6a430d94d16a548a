"""CoLLMDecoder on tiny models: the paper's limits (never defer = the base, always
defer = the assistant), cached decoding against full recomputation, lazy catch-up,
the trace, streaming, the System contract and the tokenizer check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from collab import decode
from collab.system import GenerationRequest, collect_stream
from decoding.reference import NaiveDeferralRule, recompute_greedy
from decoding.system import CoLLMDecoder, TokenizerMismatchError
from tests.contract import PROMPTS, SystemContract
from tests.decoding.conftest import random_head

PROMPT_SET = PROMPTS + ["Convert 3 km to m.", "What is 12 * 3?"]


def _req(prompt: str, n: int = 16, **kw: Any) -> GenerationRequest:
    return GenerationRequest.chat(prompt, max_tokens=n, **kw)


def greedy_ids(expert: Any, request: GenerationRequest) -> list[int]:
    """The tokens the expert's own greedy decoding chooses, end of sequence included."""
    chosen: list[int] = []

    def rule(logits: torch.Tensor, loop: Any) -> torch.Tensor:
        t = logits.argmax(dim=-1)
        chosen.append(int(t[0]))
        return t

    decode.generate(expert, request, rule)
    return chosen


def trace_ids(completion: Any) -> list[int]:
    return [t["id"] for t in completion.trace["tokens"]]


@pytest.fixture(scope="module")
def mixed_head() -> Any:
    """Random deferral vectors under which the tiny base defers about half its tokens."""
    return random_head(2, seed=1, scale=0.3)


def test_never_deferring_equals_base_greedy_token_for_token(tiny_expert: Any, assistants: list[Any], mixed_head: Any) -> None:
    d = CoLLMDecoder(tiny_expert, assistants, mixed_head, threshold=1.0)
    for p in PROMPT_SET:
        req = _req(p)
        c = d.generate(req)
        assert trace_ids(c) == greedy_ids(tiny_expert, req)
        assert c.text == tiny_expert.generate(req).text
        assert c.trace["deferral_rate"] == 0.0


def test_always_deferring_equals_assistant_greedy_token_for_token(tiny_expert: Any, assistants: list[Any]) -> None:
    d = CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, seed=2), threshold=0.0)
    for p in PROMPT_SET:
        req = _req(p)
        c = d.generate(req)
        assert trace_ids(c) == greedy_ids(assistants[0], req)
        assert c.text == assistants[0].generate(req).text
        assert c.trace["deferral_rate"] == 1.0


@pytest.mark.parametrize("k", [1, 2])
def test_cached_decoding_equals_full_recomputation_at_every_step(tiny_expert: Any, assistants: list[Any], k: int) -> None:
    d = CoLLMDecoder(tiny_expert, assistants[:k], random_head(k, seed=1, scale=0.3), threshold=0.5)
    writers: set[int] = set()
    for p in PROMPT_SET:
        req = _req(p, 20)
        c = d.generate(req)
        want = recompute_greedy(d, req)
        got = [(t["id"], d.names.index(t["by"]), t["g"]) for t in c.trace["tokens"]]
        assert [(i, w) for i, w, _ in got] == [(i, w) for i, w, _ in want]
        assert [g for *_, g in got] == pytest.approx([round(g, 4) for *_, g in want], abs=2e-4)
        writers |= {w for _, w, _ in got}
    assert writers == set(range(k + 1))  # every expert wrote somewhere: the comparison covers deferral


def _count_inputs(expert: Any) -> tuple[list[int], Any]:
    seen: list[int] = []

    def hook(_module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(int(ids.shape[1]))

    return seen, expert.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_assistant_starts_late_and_catches_up_in_one_pass(tiny_expert: Any, assistants: list[Any]) -> None:
    d = CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, seed=3, scale=0.3), threshold=0.9)
    for prompt in PROMPT_SET:  # a prompt whose first token the base writes, and with a gap between deferrals
        req = _req(prompt, 24)
        prompt_len = len(tiny_expert.encode(req))
        seen, handle = _count_inputs(assistants[0])
        try:
            c = d.generate(req)
        finally:
            handle.remove()
        deferred = [i for i, t in enumerate(c.trace["tokens"]) if t["by"] != tiny_expert.name]
        if deferred and deferred[0] > 0 and any(b - a > 1 for a, b in zip(deferred, deferred[1:])):
            break
    else:
        pytest.fail("no prompt gives late, interrupted deferrals under this head")
    # one forward pass per deferral; the first reads the prompt and the tokens before it
    assert len(seen) == len(deferred)
    assert seen[0] == prompt_len + deferred[0]
    # afterwards each pass reads exactly the tokens written since the previous one
    assert seen[1:] == [b - a for a, b in zip(deferred, deferred[1:])]
    assert sum(seen) == prompt_len + deferred[-1]  # every token read once, the prefix never again

    d_never = CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, seed=1), threshold=1.0)
    seen, handle = _count_inputs(assistants[0])
    try:
        d_never.generate(req)
    finally:
        handle.remove()
    assert seen == []  # an assistant that is never consulted never runs


def test_naive_rule_recomputes_the_prefix_and_gives_the_same_tokens(tiny_expert: Any, assistants: list[Any]) -> None:
    d = CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, seed=3, scale=0.3), threshold=0.9)
    naive = CoLLMDecoder(tiny_expert, assistants[:1], d.head, threshold=0.9)
    naive.rule_type = NaiveDeferralRule
    req = _req(PROMPT_SET[0], 24)
    seen, handle = _count_inputs(assistants[0])
    try:
        c = naive.generate(req)
    finally:
        handle.remove()
    assert c.text == d.generate(req).text
    deferred = [i for i, t in enumerate(c.trace["tokens"]) if t["by"] != tiny_expert.name]
    prompt_len = len(tiny_expert.encode(req))
    assert seen == [prompt_len + i for i in deferred]


def test_trace_records_every_step_and_sums_it_up(tiny_expert: Any, assistants: list[Any], mixed_head: Any) -> None:
    d = CoLLMDecoder(tiny_expert, assistants, mixed_head, threshold=0.5, name="duo")
    c = d.generate(_req(PROMPT_SET[3], 20))
    tr = c.trace
    assert tr["system"] == "duo" and tr["type"] == "codecode" and tr["base"] == "tiny" and tr["assistants"] == ["asst0", "asst1"]
    tokens = tr["tokens"]
    ended_by_eos = c.finish_reason == "stop"
    assert len(tokens) == c.usage.completion_tokens + (1 if ended_by_eos else 0)
    assert all(set(t) == {"id", "text", "by", "g"} and 0.0 <= t["g"] <= 1.0 for t in tokens)
    assert all((t["by"] != "tiny") == (t["g"] > 0.5) for t in tokens)
    assert tr["tokens_by_expert"] == {n: sum(t["by"] == n for t in tokens) for n in ("tiny", "asst0", "asst1")}
    assert tr["deferral_rate"] == pytest.approx(sum(t["by"] != "tiny" for t in tokens) / len(tokens), abs=1e-4)
    assert "".join(t["text"] for t in tokens[: c.usage.completion_tokens]).startswith(c.text[:4])


def test_stream_equals_generate_with_the_trace(tiny_expert: Any, assistants: list[Any], mixed_head: Any) -> None:
    d = CoLLMDecoder(tiny_expert, assistants, mixed_head, threshold=0.5)
    for p in PROMPT_SET:
        for kw in ({}, {"temperature": 0.9, "seed": 3}):
            req = _req(p, 16, **kw)
            gen = d.generate(req)
            streamed = collect_stream(d.stream(req))
            assert streamed.text == gen.text and streamed.finish_reason == gen.finish_reason
            assert streamed.trace == gen.trace


def test_sampling_follows_the_request(tiny_expert: Any, assistants: list[Any], mixed_head: Any) -> None:
    d = CoLLMDecoder(tiny_expert, assistants, mixed_head, threshold=0.5)
    req = _req(PROMPT_SET[3], 16, temperature=1.2, seed=5)
    a, b = d.generate(req), d.generate(req)
    assert a.text == b.text and a.trace == b.trace  # seeded: reproducible
    samples = {d.generate(_req(PROMPT_SET[3], 16, temperature=1.2, seed=s)).text for s in range(4)}
    assert len(samples) >= 2
    # a seeded request samples the same tokens alone or in a batch
    batch = d.generate_batch([_req(p, 16, temperature=1.2, seed=5) for p in PROMPT_SET[2:5]])
    assert batch[1].text == a.text


def test_generate_batch_equals_generate(tiny_expert: Any, assistants: list[Any], mixed_head: Any) -> None:
    d = CoLLMDecoder(tiny_expert, assistants, mixed_head, threshold=0.5)
    reqs = [_req(p, 16) for p in PROMPT_SET]
    batch = d.generate_batch(reqs)
    single = [d.generate(r) for r in reqs]
    assert [b.text for b in batch] == [s.text for s in single]
    assert [trace_ids(b) for b in batch] == [trace_ids(s) for s in single]
    assert [[t["by"] for t in b.trace["tokens"]] for b in batch] == [[t["by"] for t in s.trace["tokens"]] for s in single]


class TestCoDecoderContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Any, assistants: list[Any]) -> Any:
        return CoLLMDecoder(tiny_expert, assistants, random_head(2, seed=1, scale=0.3), threshold=0.5, name="duo")


def test_hidden_state_read_is_the_final_norm_output(tiny_expert: Any) -> None:
    from collab.errors import CollabError
    from decoding.system import final_hidden_state

    out = tiny_expert.forward(torch.tensor([[5, 6, 7]]), output_hidden_states=True, use_cache=False)
    final_hidden_state(tiny_expert, out.hidden_states[-1], out.logits)  # the LM head reads hidden_states[-1]
    with pytest.raises(CollabError, match="not what its LM head reads"):
        final_hidden_state(tiny_expert, out.hidden_states[-2], out.logits)  # the last layer's output, before the norm


def test_tokenizer_mismatch_names_both_vocabularies(tiny_expert: Any, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from collab.experts import Expert
    from tests.tiny import make_tokenizer

    tok = make_tokenizer(vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "other"))
    tok.save_pretrained(str(tmp_path / "other"))
    other = Expert.load(tmp_path / "other", name="other")
    with pytest.raises(TokenizerMismatchError) as e:
        CoLLMDecoder(tiny_expert, [other], random_head(1), threshold=0.5)
    msg = str(e.value)
    assert f"expert 'tiny' ({len(tiny_expert.tokenizer)} tokens" in msg and f"expert 'other' ({len(tok)} tokens" in msg


def test_head_must_fit_the_experts(tiny_expert: Any, assistants: list[Any]) -> None:
    from decoding.artefact import HeadError

    with pytest.raises(HeadError, match="trained for 1 assistant"):
        CoLLMDecoder(tiny_expert, assistants, random_head(1), threshold=0.5)
    with pytest.raises(HeadError, match="hidden states of size 16"):
        CoLLMDecoder(tiny_expert, assistants[:1], random_head(1, hidden=16), threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        CoLLMDecoder(tiny_expert, assistants[:1], random_head(1), threshold=1.5)
