"""Co-LLM on the real zoo models (slow: loads SmolLM2-135M, a domain expert and Gemma-3-270M)."""

from __future__ import annotations

from typing import Any

import pytest

from collab.system import GenerationRequest
from decoding.system import CoLLMDecoder, TokenizerMismatchError
from tests.decoding.conftest import random_head
from tests.decoding.test_system import greedy_ids, trace_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> Any:
    from collab.experts import Expert

    return Expert.load("zoo:smollm2-135m-instruct", name="smol")


@pytest.fixture(scope="module")
def arith() -> Any:
    from collab.experts import Expert

    return Expert.load("zoo:smol-arith", name="arith")


def test_limits_on_real_models(smol: Any, arith: Any) -> None:
    """eta = 1 is SmolLM2's own greedy answer, eta = 0 smol-arith's, token for token;
    building the decoder checks that SmolLM2's last hidden state is its final-norm output."""
    head = random_head(1, seed=0, scale=0.05, hidden=576)
    for prompt in ("What is 123 + 456?", "Name three colours."):
        req = GenerationRequest.chat(prompt, max_tokens=16)
        assert trace_ids(CoLLMDecoder(smol, [arith], head, threshold=1.0).generate(req)) == greedy_ids(smol, req)
        assert trace_ids(CoLLMDecoder(smol, [arith], head, threshold=0.0).generate(req)) == greedy_ids(arith, req)


def test_smollm2_and_gemma_do_not_share_a_tokenizer(smol: Any) -> None:
    from collab.experts import Expert

    gemma = Expert.load("zoo:gemma3-270m", name="gemma")
    with pytest.raises(TokenizerMismatchError) as e:
        CoLLMDecoder(smol, [gemma], random_head(1, hidden=576), threshold=0.5)
    msg = str(e.value)
    assert f"expert 'smol' ({len(smol.tokenizer)} tokens" in msg and f"expert 'gemma' ({len(gemma.tokenizer)} tokens" in msg
