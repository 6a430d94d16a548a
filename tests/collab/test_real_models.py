"""Slow tests on the real zoo models (SmolLM2-135M-Instruct, Gemma-3-270M)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from collab.system import GenerationRequest
from tests.contract import SystemContract

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> Any:
    from collab.experts import Expert

    return Expert.load("zoo:smollm2-135m-instruct", name="smol")


@pytest.fixture(scope="module")
def gemma() -> Any:
    from collab.experts import Expert

    return Expert.load("zoo:gemma3-270m", name="gemma")


def test_smol_knows_the_capital_of_france(smol: Any) -> None:
    c = smol.generate(GenerationRequest.chat("What is the capital of France?", max_tokens=24))
    assert "Paris" in c.text
    assert c.finish_reason == "stop"
    assert c.trace["prompt_format"] == "chat_template"


def test_smol_prefers_paris(smol: Any) -> None:
    assert smol.loglikelihood("The capital of France is", " Paris") > smol.loglikelihood("The capital of France is", " Berlin") + 3


def test_smol_cached_load_is_fast() -> None:
    from collab.experts import Expert

    Expert.load("zoo:smollm2-135m-instruct")  # warm the cache if a fresh machine
    t0 = time.perf_counter()
    Expert.load("zoo:smollm2-135m-instruct")
    assert time.perf_counter() - t0 < 10  # about 0.5 s on an idle machine


def test_gemma_uses_plain_format_and_answers(gemma: Any) -> None:
    assert gemma.prompt_format == "plain"
    c = gemma.generate(GenerationRequest(prompt="Capital of Germany: Berlin\nCapital of Italy: Rome\nCapital of France:", max_tokens=4))
    assert c.text.strip().startswith("Paris")
    chat = gemma.generate(GenerationRequest.chat("What is the capital of France?", max_tokens=24))
    assert chat.trace["prompt_format"] == "plain"
    assert "\nUser:" not in chat.text
    assert gemma.loglikelihood("The capital of France is", " Paris") > gemma.loglikelihood("The capital of France is", " Berlin")


class TestSmolContract(SystemContract):
    @pytest.fixture
    def system(self, smol: Any) -> Any:
        return smol


class TestGemmaContract(SystemContract):
    max_tokens = 10

    @pytest.fixture
    def system(self, gemma: Any) -> Any:
        return gemma
