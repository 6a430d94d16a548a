"""Training conversations: prompt turns and the answer to learn, read from a
JSONL file or drawn from the zoo's skills. One reader for every trainer
(``collab decode train``, ``collab latent train``), with one set of errors.

Sources:

- a JSONL file, one example per line: ``{"prompt": "...", "response": "..."}``
  (the prompt is one user turn) or ``{"messages": [..., {"role": "assistant",
  "content": "..."}]}`` (every turn but the last is the prompt); with
  ``raw=True`` also ``{"context": "...", "continuation": "..."}``: raw text
  continued as is, without a chat template;
- ``skill:arith``, ``skill:lists``, ``skill:units`` or ``skill:mixed``: the
  training split of the zoo's skills (``collab.skills.TRAIN_SEED``, the seed the
  domain experts were trained with; disjoint from the ``skill:*`` benchmarks).

Tokenising is the trainer's business (each has its own prompt and answer
layout); this module knows nothing about tokenizers and imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collab.errors import CollabError
from collab.io import jsonl_rows
from collab.system import GenerationRequest

SOURCES = "a .jsonl file or skill:arith|lists|units|mixed"


class DataError(CollabError):
    """Training data that cannot be read, naming the file, line and field."""


@dataclass(frozen=True)
class Conversation:
    """The prompt turns and the answer to learn; ``raw``: one text prompt (the
    context) continued as is, without a chat template."""

    messages: tuple[tuple[str, str], ...]
    response: str
    raw: bool = False

    def request(self) -> GenerationRequest:
        """The prompt as a request (what the model reads before the answer)."""
        if self.raw:
            return GenerationRequest(prompt=self.messages[0][1])
        return GenerationRequest(messages=[{"role": r, "content": c} for r, c in self.messages])


@dataclass
class Conversations:
    """The conversations of one source; ``sha256`` fingerprints them (the
    training data hash an artefact records)."""

    source: str
    items: list[Conversation]

    @property
    def sha256(self) -> str:
        from collab.io import sha256_text

        return sha256_text("\n".join(json.dumps([c.messages, c.response] + ([True] if c.raw else [])) for c in self.items))

    def describe(self) -> dict[str, Any]:
        """Source, size and hash, as an artefact's ``data`` records them."""
        return {"source": self.source, "examples": len(self.items), "sha256": self.sha256}


def read_conversations(source: str, limit: int | None = None, *, raw: bool = False) -> tuple[str, list[Conversation]]:
    """(the source's name, its conversations): the first ``limit`` lines of a JSONL
    file, or ``limit`` (default 1000) drawn from ``skill:NAME``. ``raw`` also
    accepts ``{context, continuation}`` lines. DataError naming the file, line
    and field otherwise."""
    if source.startswith("skill:"):
        return source, skill_conversations(source[6:], limit or 1000)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: training data not found (expected {SOURCES})")
    items: list[Conversation] = []
    for n, row in jsonl_rows(path, DataError):
        items.append(parse_conversation(row, f"{path}:{n}", raw=raw))
        if limit is not None and len(items) >= limit:
            break  # before the next line is parsed: lines past the limit are never read
    if not items:
        raise DataError(f"{path}: no examples")
    return str(path), items


def parse_conversation(row: Any, where: str, *, raw: bool = False) -> Conversation:
    """One JSONL row as a Conversation; ``where`` (``FILE:LINE``) leads every error."""
    if not isinstance(row, dict):
        formats = "'prompt' and 'response', 'messages', or 'context' and 'continuation'" if raw else "'prompt' and 'response', or 'messages'"
        raise DataError(f"{where}: expected an object with {formats}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: messages: expected a list of at least two turns, the last by the assistant")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}]: expected {{'role': system|user|assistant, 'content': str}}, found {m!r}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: messages: the last turn is the answer to learn and must be the assistant's, found {msgs[-1]['role']!r}")
        return Conversation(tuple((m["role"], m["content"]) for m in msgs[:-1]), msgs[-1]["content"])
    if raw and "context" in row:
        for key in ("context", "continuation"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise DataError(f"{where}: {key}: expected a non-empty string, found {row.get(key)!r}")
        return Conversation((("user", row["context"]),), row["continuation"], raw=True)
    for key in ("prompt", "response"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise DataError(f"{where}: {key}: expected a non-empty string (or give 'messages'), found {row.get(key)!r}")
    return Conversation((("user", row["prompt"]),), row["response"])


def skill_conversations(name: str, n: int) -> list[Conversation]:
    """``n`` questions of the zoo skill ``name`` (or of all, interleaved, for
    ``mixed``) from its training split, each answered by its reference answer."""
    from collab import skills

    names = list(skills.SKILLS) if name == "mixed" else [name]
    if any(s not in skills.SKILLS for s in names):
        raise DataError(f"skill:{name}: unknown skill; expected one of {', '.join(['mixed', *skills.SKILLS])}")
    per = [skills.generate(s, -(-n // len(names)), skills.TRAIN_SEED) for s in names]
    drawn = [ex for group in zip(*per) for ex in group][:n]  # interleaved, so a prefix mixes every skill
    return [Conversation((("user", e.question),), e.answer) for e in drawn]
