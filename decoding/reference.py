"""Slow reference implementations of Co-LLM decoding, for tests and benchmarks only.

- ``recompute_greedy``: no KV cache at all. Every step runs the base (and, where
  it defers, the assistant) over the whole sequence so far, as the reference
  code does by re-sending the prompt on every call. The cached ``CoLLMDecoder``
  must choose the same tokens with the same g_t.
- ``NaiveDeferralRule``: the base keeps its cache, but an assistant recomputes
  its whole prefix at every deferral instead of catching up; the benchmark's
  baseline for what incremental catch-up saves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from decoding.system import DeferralRule

if TYPE_CHECKING:
    import torch

    from collab.decode import Loop
    from collab.system import GenerationRequest
    from decoding.system import CoLLMDecoder


def _last(expert: Any, ids: list[int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(final hidden state (H,), logits (V,)) after ``ids``, with no cache."""
    import torch

    out = expert.forward(torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][0, -1], out.logits[0, -1].float()


def recompute_greedy(decoder: "CoLLMDecoder", request: "GenerationRequest") -> list[tuple[int, int, float]]:
    """Greedy Co-LLM decoding of ``request`` without any cache: per step (token,
    writer index, g_t), up to and including an end-of-sequence token or
    ``max_tokens``. Stop strings are not applied (compare the tokens)."""
    import torch

    from decoding.head import choose_writers, deferral_probability

    ids = decoder.base.encode(request)
    eos = set(decoder.base.eos_token_ids)
    steps: list[tuple[int, int, float]] = []
    for _ in range(decoder.base.max_new_tokens(request, len(ids))):
        hidden, logits = _last(decoder.base, ids)
        with torch.inference_mode():
            log_pz = decoder.head.log_probs(hidden[None])
        writer = int(choose_writers(log_pz, decoder.threshold)[0])
        if writer:
            _, logits = _last(decoder.assistants[writer - 1], ids)
        token = int(logits.argmax())
        steps.append((token, writer, float(deferral_probability(log_pz)[0])))
        if token in eos:
            break
        ids = ids + [token]
    return steps


class NaiveDeferralRule(DeferralRule):
    """``DeferralRule`` whose assistants forget their cache: every consultation
    recomputes the whole prompt and every token so far."""

    def _consult(self, j: int, rows: list[int], loop: "Loop") -> "torch.Tensor":
        self.sessions[j] = None
        return super()._consult(j, rows, loop)
