"""Training data for a deferral head: chat conversations whose last turn is the
answer to learn.

Sources (``--data``), read by ``collab.conversations`` (the reader every trainer
shares): a JSONL file of ``{"prompt", "response"}`` or ``{"messages": [...]}``
lines, or ``skill:arith|lists|units|mixed`` (the zoo skills' training split).

Each example becomes the base's prompt ids (its chat template) and the answer's
ids followed by the end-of-sequence token; only the answer tokens are trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collab.conversations import Conversation, Conversations, DataError, read_conversations

if TYPE_CHECKING:
    from collab.experts import Expert

__all__ = ["Conversation", "DataError", "TrainingData", "load_data"]


class TrainingData(Conversations):
    """The conversations of one source, and their token ids for one tokenizer."""

    @property
    def conversations(self) -> list[Conversation]:
        return self.items

    def tokenize(self, expert: "Expert") -> list[tuple[list[int], list[int]]]:
        """Per conversation: (prompt ids, answer ids + end of sequence)."""
        end = expert.tokenizer.eos_token_id
        out = []
        for c in self.items:
            answer = expert.tokenizer(c.response, add_special_tokens=False).input_ids
            out.append((expert.encode(c.request()), list(answer) + [int(end)]))
        return out


def load_data(source: str, limit: int | None = None) -> TrainingData:
    """The conversations of ``source`` (a JSONL path or ``skill:NAME``), the first ``limit``."""
    return TrainingData(*read_conversations(source, limit))
