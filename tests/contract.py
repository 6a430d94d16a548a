"""The contract every System kind passes: generate, stream equals generate,
stop sequences, max_tokens, temperature and top_p, a trace, greedy
determinism, batched generation.

Subclass ``SystemContract`` in a test module and provide a ``system`` fixture
(see tests/collab/test_expert_contract.py); pytest collects the subclass.
"""

from __future__ import annotations

from typing import Any

import pytest

from collab.system import Completion, GenerationRequest, System, collect_stream

PROMPTS = ["What is 2 + 2?", "The capital of France is", "Reverse the list [1, 2, 3].", "Count from 1 to 30, separated by commas."]


class SystemContract:
    """Mix-in test class; subclasses define the ``system`` fixture."""

    max_tokens = 16

    @pytest.fixture
    def system(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def request(self, prompt: str = PROMPTS[0], **kw: Any) -> GenerationRequest:
        kw.setdefault("max_tokens", self.max_tokens)
        return GenerationRequest.chat(prompt, **kw)

    def test_is_a_system(self, system: Any) -> None:
        assert isinstance(system, System)
        assert isinstance(system.name, str) and system.name

    def test_generate_returns_completion(self, system: Any) -> None:
        c = system.generate(self.request())
        assert isinstance(c, Completion)
        assert isinstance(c.text, str)
        assert c.finish_reason in ("stop", "length")
        assert c.usage.prompt_tokens > 0
        assert 0 < c.usage.completion_tokens <= self.max_tokens
        assert c.trace.get("system") == system.name

    def test_greedy_is_deterministic(self, system: Any) -> None:
        a = system.generate(self.request(PROMPTS[1]))
        b = system.generate(self.request(PROMPTS[1]))
        assert a.text == b.text and a.usage == b.usage

    def test_stream_equals_generate(self, system: Any) -> None:
        for prompt in PROMPTS:
            req = self.request(prompt)
            gen = system.generate(req)
            chunks = list(system.stream(req))
            assert chunks and chunks[-1].finish_reason == gen.finish_reason
            assert all(ch.finish_reason is None for ch in chunks[:-1])
            streamed = collect_stream(iter(chunks))
            assert streamed.text == gen.text
            assert streamed.trace.get("system") == system.name

    def longest(self, system: Any) -> tuple[GenerationRequest, Completion]:
        """The prompt whose greedy answer is longest, and that answer. The
        max_tokens and stop checks need one of at least a few tokens; a system
        that answers every prompt in one token fails them."""
        best = max(((r, system.generate(r)) for r in (self.request(p) for p in PROMPTS)), key=lambda rc: len(rc[1].text))
        assert best[1].usage.completion_tokens > 4 and len(best[1].text) > 8, f"no prompt gives a usable answer: {best[1]!r}"
        return best

    def test_max_tokens(self, system: Any) -> None:
        full_req, full = self.longest(system)
        msgs = full_req.messages
        cut = system.generate(GenerationRequest(messages=msgs, max_tokens=3))
        assert cut.finish_reason == "length"
        assert cut.usage.completion_tokens == 3
        # the three tokens are the start of the longer greedy answer (a token cut inside a
        # multi-byte character decodes to U+FFFD)
        head = cut.text.rstrip("\ufffd")
        assert head and full.text.startswith(head)
        streamed = collect_stream(system.stream(GenerationRequest(messages=msgs, max_tokens=3)))
        assert streamed.text == cut.text and streamed.finish_reason == "length"

    def test_stop_sequence_cuts_output(self, system: Any) -> None:
        req, full = self.longest(system)
        text = full.text
        candidates = [i for i in range(2, len(text) - 2) if not text[i : i + 2].isspace() and "\ufffd" not in text[i : i + 2]]
        assert candidates, f"no stop string can be picked from {text!r}"
        at = candidates[len(candidates) // 2]
        stop = text[at : at + 2]
        cut = system.generate(GenerationRequest(messages=req.messages, max_tokens=self.max_tokens, stop=[stop]))
        assert cut.text == text[: text.find(stop)]
        assert len(cut.text) < len(text)
        assert cut.finish_reason == "stop"
        streamed = collect_stream(system.stream(GenerationRequest(messages=req.messages, max_tokens=self.max_tokens, stop=[stop])))
        assert streamed.text == cut.text

    def test_temperature_changes_the_output(self, system: Any) -> None:
        req, greedy = self.longest(system)
        samples = {system.generate(GenerationRequest(messages=req.messages, max_tokens=self.max_tokens, temperature=1.5, seed=s)).text for s in range(4)}
        # a system that ignored temperature would answer greedily four times
        assert len(samples) >= 2 or samples != {greedy.text}

    def test_top_p_narrows_sampling(self, system: Any) -> None:
        req, greedy = self.longest(system)
        # top_p this small keeps only the most likely token at every step, so hot sampling
        # gives the greedy answer; a system that ignored top_p would sample freely
        for s in range(3):
            narrow = GenerationRequest(messages=req.messages, max_tokens=self.max_tokens, temperature=1.5, top_p=1e-6, seed=s)
            assert system.generate(narrow).text == greedy.text

    def test_seeded_sampling_is_reproducible(self, system: Any) -> None:
        a = system.generate(self.request(temperature=1.0, seed=7))
        b = system.generate(self.request(temperature=1.0, seed=7))
        assert a.text == b.text

    def test_generate_batch_matches_generate(self, system: Any) -> None:
        reqs = [self.request(p) for p in PROMPTS]
        if not hasattr(system, "generate_batch"):
            pytest.skip("system has no batched generation")
        batch = system.generate_batch(reqs)
        assert [b.text for b in batch] == [system.generate(r).text for r in reqs]
