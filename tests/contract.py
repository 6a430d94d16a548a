"""The contract every System kind passes: generate, stream equals generate,
stop sequences, max_tokens, a trace, greedy determinism, batched generation.

Subclass ``SystemContract`` in a test module and provide a ``system`` fixture
(see tests/collab/test_expert_contract.py); pytest collects the subclass.
"""

from __future__ import annotations

from typing import Any

import pytest

from collab.system import Completion, GenerationRequest, System, collect_stream

PROMPTS = ["What is 2 + 2?", "The capital of France is", "Reverse the list [1, 2, 3]."]


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

    def test_max_tokens(self, system: Any) -> None:
        c = system.generate(self.request(max_tokens=3))
        assert c.usage.completion_tokens <= 3
        full = system.generate(self.request(max_tokens=self.max_tokens))
        if full.usage.completion_tokens > 3:
            assert c.finish_reason == "length"
            assert full.text.startswith(c.text.rstrip("\ufffd")[:1])

    def test_stop_sequence_cuts_output(self, system: Any) -> None:
        full = system.generate(self.request(PROMPTS[2]))
        text = full.text
        candidates = [i for i in range(2, len(text) - 2) if not text[i : i + 2].isspace() and "\ufffd" not in text[i : i + 2]]
        if not candidates:
            pytest.skip(f"output too short to pick a stop string: {text!r}")
        stop = text[candidates[len(candidates) // 2] : candidates[len(candidates) // 2] + 2]
        cut = system.generate(self.request(PROMPTS[2], stop=[stop]))
        assert cut.text == text[: text.find(stop)]
        assert cut.finish_reason == "stop"
        streamed = collect_stream(system.stream(self.request(PROMPTS[2], stop=[stop])))
        assert streamed.text == cut.text

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
