"""Training data for a deferral head: chat conversations whose last turn is the
answer to learn.

Sources (``--data``):

- a JSONL file, one example per line: ``{"prompt": "...", "response": "..."}``
  (the prompt is one user turn) or ``{"messages": [..., {"role": "assistant",
  "content": "..."}]}`` (every turn but the last is the prompt);
- ``skill:arith``, ``skill:lists``, ``skill:units`` or ``skill:mixed``: the
  training split of the zoo's skills (``collab.skills``, the training seed the
  domain experts were trained with; disjoint from the ``skill:*`` benchmarks).

Each example becomes the base's prompt ids (its chat template) and the answer's
ids followed by the end-of-sequence token; only the answer tokens are trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab.errors import CollabError
from collab.system import GenerationRequest, Message

if TYPE_CHECKING:
    from collab.experts import Expert


class DataError(CollabError):
    """Training data that cannot be read, naming the file, line and field."""


@dataclass(frozen=True)
class Conversation:
    """The prompt turns and the answer to learn."""

    messages: tuple[tuple[str, str], ...]
    response: str

    def request(self) -> GenerationRequest:
        return GenerationRequest(messages=[{"role": r, "content": c} for r, c in self.messages])


@dataclass
class TrainingData:
    """The conversations of one source, and their token ids for one tokenizer."""

    source: str
    conversations: list[Conversation]

    @property
    def sha256(self) -> str:
        from collab.io import sha256_text

        return sha256_text("\n".join(json.dumps([c.messages, c.response]) for c in self.conversations))

    def tokenize(self, expert: "Expert") -> list[tuple[list[int], list[int]]]:
        """Per conversation: (prompt ids, answer ids + end of sequence)."""
        end = expert.tokenizer.eos_token_id
        out = []
        for c in self.conversations:
            answer = expert.tokenizer(c.response, add_special_tokens=False).input_ids
            out.append((expert.encode(c.request()), list(answer) + [int(end)]))
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "examples": len(self.conversations), "sha256": self.sha256}


def load_data(source: str, limit: int | None = None) -> TrainingData:
    """The conversations of ``source`` (a JSONL path or ``skill:NAME``), the first ``limit``."""
    if source.startswith("skill:"):
        return TrainingData(source, _skill_conversations(source[6:], limit or 1000))
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: training data not found (expected a .jsonl file or skill:arith|lists|units|mixed)")
    convs: list[Conversation] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(convs) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            convs.append(_conversation(row, f"{path}:{n}"))
    if not convs:
        raise DataError(f"{path}: no examples")
    return TrainingData(str(path), convs)


def _conversation(row: Any, where: str) -> Conversation:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'response', or 'messages'")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: messages: expected a list of at least two turns, the last by the assistant")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}]: expected {{'role': system|user|assistant, 'content': str}}, found {m!r}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: messages: the last turn is the answer to learn and must be the assistant's, found {msgs[-1]['role']!r}")
        prompt: list[Message] = msgs[:-1]
        return Conversation(tuple((m["role"], m["content"]) for m in prompt), msgs[-1]["content"])
    for key in ("prompt", "response"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise DataError(f"{where}: {key}: expected a non-empty string (or give 'messages'), found {row.get(key)!r}")
    return Conversation((("user", row["prompt"]),), row["response"])


def _skill_conversations(name: str, n: int) -> list[Conversation]:
    from collab import skills

    names = list(skills.SKILLS) if name == "mixed" else [name]
    if any(s not in skills.SKILLS for s in names):
        raise DataError(f"skill:{name}: unknown skill; expected one of {', '.join(['mixed', *skills.SKILLS])}")
    per = [skills.generate(s, -(-n // len(names)), skills.TRAIN_SEED) for s in names]
    drawn = [ex for group in zip(*per) for ex in group][:n]  # interleaved, so a prefix mixes every skill
    return [Conversation((("user", e.question),), e.answer) for e in drawn]
