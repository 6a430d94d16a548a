"""Training conversations for a mixture: prompt turns and the answer to learn.

Sources (``--data``), read by ``collab.conversations`` (the reader ``collab
decode train`` uses too), plus one format of the mixture's own:

- a JSONL file, one example per line: ``{"prompt": "...", "response": "..."}``
  (one user turn) or ``{"messages": [..., {"role": "assistant", "content": "..."}]}``
  (every turn but the last is the prompt), or ``{"context": "...", "continuation":
  "..."}``: raw text without any chat template, scored as ``loglikelihood(context,
  continuation)`` scores it (a multiple-choice question and its gold answer);
- ``skill:arith|lists|units|mixed``: the training split of the zoo's skills
  (``collab.skills.TRAIN_SEED``, disjoint from the ``skill:*`` benchmarks).

A benchmark's training split (ARC-Easy, MMLU) is written to such a JSONL file
first (``bench/latent.py`` does); collab's core does not import the evaluation
package. Each expert tokenises every conversation itself (``tokenize``): its own
prompt format, the answer, then its end-of-sequence token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from collab import conversations
from collab.conversations import Conversation, DataError, read_conversations

if TYPE_CHECKING:
    from collab.experts import Expert

__all__ = ["Conversation", "Conversations", "LatentDataError", "load_conversations"]

#: Training data that cannot be read (the core's DataError, under the name this package used first).
LatentDataError = DataError


class Conversations(conversations.Conversations):
    """The conversations of one source, tokenised per expert."""

    def queries(self) -> list[str]:
        """The text the router reads for each conversation (as at inference)."""
        return [c.request().text_for_routing() for c in self.items]

    def tokenize(self, expert: "Expert", max_prompt: int, max_answer: int) -> list[tuple[list[int], list[int]]]:
        """Per conversation, in ``expert``'s tokens: (prompt, at most its last
        ``max_prompt`` tokens; answer + end of sequence, at most ``max_answer``)."""
        eos = int(expert.eos_token_ids[0] if expert.tokenizer.eos_token_id is None else expert.tokenizer.eos_token_id)
        lead = " " if expert.prompt_format == "plain" else ""  # the plain format ends in "Assistant:"
        out = []
        for c in self.items:
            if c.raw:  # split as loglikelihood scoring splits it; no end of sequence
                ctx, cont = expert._split_context(c.messages[0][1], c.response)
                out.append((ctx[-max_prompt:], cont[:max_answer]))
                continue
            prompt = expert.encode(c.request())[-max_prompt:]
            answer = list(expert.tokenizer(lead + c.response, add_special_tokens=False).input_ids)[: max_answer - 1] + [eos]
            out.append((prompt, answer))
        return out


def load_conversations(source: "str | Sequence[Conversation]", limit: int | None = None) -> Conversations:
    """The conversations of ``source`` (a JSONL path, ``skill:NAME``, or a list), the first ``limit``."""
    if not isinstance(source, str):
        items = list(source)[:limit] if limit else list(source)
        if not items:
            raise DataError("training data: no examples")
        return Conversations("<memory>", items)
    return Conversations(*read_conversations(source, limit, raw=True))
