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


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_embed_equals_hf_hidden_states_and_separates_topics(which: str, smol: Any, gemma: Any) -> None:
    import numpy as np
    import torch

    e = {"smol": smol, "gemma": gemma}[which]
    texts = ["Solve for x: 3x + 5 = 20.", "What is 7 times 8 minus 6?", "Write a Python function that reverses a list.", "def add(a, b): return a + b"]
    n = len(e.model.base_model.layers)
    got = e.embed(texts, [2, n])
    h = got.shape[1] // 2
    ids = torch.tensor([e.tokenizer(texts[0])["input_ids"]])
    with torch.inference_mode():
        hs = e.model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(got[0, :h], hs[2][0].mean(0).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0, h:], hs[n][0].mean(0).numpy(), rtol=1e-4, atol=1e-4)
    # Centred last-layer vectors: the two maths prompts are closer to each other than to the code prompts.
    z = got[:, h:] - got[:, h:].mean(0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3]) and sim[2, 3] > max(sim[2, 0], sim[2, 1])


class TestSmolContract(SystemContract):
    @pytest.fixture
    def system(self, smol: Any) -> Any:
        return smol


class TestGemmaContract(SystemContract):
    max_tokens = 10

    @pytest.fixture
    def system(self, gemma: Any) -> Any:
        return gemma
