"""Training conversations for a mixture: prompt turns and the answer to learn.

Sources (``--data``), in the same formats ``collab decode train`` reads:

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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from collab.errors import CollabError
from collab.system import GenerationRequest

if TYPE_CHECKING:
    from collab.experts import Expert


class LatentDataError(CollabError):
    """Training data that cannot be read, naming the file, line and field."""


@dataclass(frozen=True)
class Conversation:
    """The prompt turns and the answer to learn; ``raw``: one text prompt (the
    context) continued as is, without a chat template."""

    messages: tuple[tuple[str, str], ...]
    response: str
    raw: bool = False

    def request(self) -> GenerationRequest:
        if self.raw:
            return GenerationRequest(prompt=self.messages[0][1])
        return GenerationRequest(messages=[{"role": r, "content": c} for r, c in self.messages])


@dataclass
class Conversations:
    """The conversations of one source."""

    source: str
    items: list[Conversation]

    @property
    def sha256(self) -> str:
        from collab.io import sha256_text

        return sha256_text("\n".join(json.dumps([c.messages, c.response] + ([True] if c.raw else [])) for c in self.items))

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

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "examples": len(self.items), "sha256": self.sha256}


def load_conversations(source: "str | Sequence[Conversation]", limit: int | None = None) -> Conversations:
    """The conversations of ``source`` (a JSONL path, ``skill:NAME``, or a list), the first ``limit``."""
    if not isinstance(source, str):
        items = list(source)[:limit] if limit else list(source)
        if not items:
            raise LatentDataError("training data: no examples")
        return Conversations("<memory>", items)
    if source.startswith("skill:"):
        return Conversations(source, _skill(source[6:], limit or 1000))
    path = Path(source)
    if not path.is_file():
        raise LatentDataError(f"{source}: training data not found (expected a .jsonl file or skill:arith|lists|units|mixed)")
    items: list[Conversation] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LatentDataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            items.append(_conversation(row, f"{path}:{n}"))
    if not items:
        raise LatentDataError(f"{path}: no examples")
    return Conversations(str(path), items)


def _conversation(row: Any, where: str) -> Conversation:
    if not isinstance(row, dict):
        raise LatentDataError(f"{where}: expected an object with 'prompt' and 'response', 'messages', or 'context' and 'continuation'")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise LatentDataError(f"{where}: messages: expected a list of at least two turns, the last by the assistant")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise LatentDataError(f"{where}: messages[{i}]: expected {{'role': system|user|assistant, 'content': str}}, found {m!r}")
        if msgs[-1]["role"] != "assistant":
            raise LatentDataError(f"{where}: messages: the last turn is the answer to learn and must be the assistant's, found {msgs[-1]['role']!r}")
        return Conversation(tuple((m["role"], m["content"]) for m in msgs[:-1]), msgs[-1]["content"])
    if "context" in row:
        for key in ("context", "continuation"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise LatentDataError(f"{where}: {key}: expected a non-empty string, found {row.get(key)!r}")
        return Conversation((("user", row["context"]),), row["continuation"], raw=True)
    for key in ("prompt", "response"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise LatentDataError(f"{where}: {key}: expected a non-empty string (or give 'messages'), found {row.get(key)!r}")
    return Conversation((("user", row["prompt"]),), row["response"])


def _skill(name: str, n: int) -> list[Conversation]:
    from collab import skills

    names = list(skills.SKILLS) if name == "mixed" else [name]
    if any(s not in skills.SKILLS for s in names):
        raise LatentDataError(f"skill:{name}: unknown skill; expected one of {', '.join(['mixed', *skills.SKILLS])}")
    per = [skills.generate(s, -(-n // len(names)), skills.TRAIN_SEED) for s in names]
    drawn = [ex for group in zip(*per) for ex in group][:n]  # interleaved, so a prefix mixes every skill
    return [Conversation((("user", e.question),), e.answer) for e in drawn]
