"""FusionFactory's thought and model levels: what the pool's responses in a routing table teach.

Feng et al., "Fusing LLM Capabilities with Routing Data" (arXiv 2507.10540, code
ulab-uiuc/FusionFactory). Query-level fusion is what collab's routers do; this module
holds the two other levels' data side:

- **Thought level.** ``build_thought_bank`` takes, for each query of a routing table
  that holds the pool's responses, its top responses (``top_responses``: score high to
  low, then cost low to high, the first ``pre`` of those re-sorted by a judge score when
  the table gives one, then the first ``top``), asks a summariser model for a short
  thought template (task summary, reasoning steps, answer format) and stores the
  templates with MiniLM embeddings of their queries: a *thought bank*
  (``collab fuse thought build``). ``ThoughtSystem`` (``type: thought``) retrieves the
  ``k`` most similar queries' templates within the query's task and prepends them, in the
  reference's prompt layout, to the target model's prompt; ``mode: fewshot`` prepends the
  same queries with their gold answers instead (the baseline the templates must beat).
- **Model level.** ``distill_examples`` picks the fine-tuning set: per query its gold
  answer once, then up to ``k`` of the pool's responses sorted by score (high first) and
  length (long first), stopping at the first response scored 0, as the reference's
  ``sft_data_gen.py`` does; the ``gold`` setting repeats the gold answers to the same
  size. ``merging.distill`` trains on it (``collab fuse distill``).

A routing table with responses is the canonical table (DESIGN.md) plus two fields per
row: ``responses`` ({expert: text}) and ``gold`` (the reference answer); an optional
``judge`` ({expert: score}) orders ties as the reference's LLM judge does.
``collab eval --routing-table OUT --responses`` writes one.

Ties are broken by expert name (responses) and by id (retrieval), so every choice is
reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from collab.artefacts import ArtefactKind, read_artefact_config
from collab.errors import CollabError, RequestError
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk

REFERENCE_URL = "https://arxiv.org/abs/2507.10540"
BANK_VERSION = 1
BANK_CONFIG = "config.json"
BANK_ENTRIES = "templates.jsonl"
BANK_TENSORS = "embeddings.safetensors"
MODES = ("thought", "fewshot")
SETTINGS = ("perf", "judge", "gold")
#: The reference truncates each response to this many characters in the summariser's prompt.
RESPONSE_CHARS = 1000


BANK_KIND = ArtefactKind(
    type="thought_bank", version=BANK_VERSION, required=("encoder", "entries"), noun="thought bank",
    description="a thought bank of FusionFactory templates", train_command="collab fuse thought build",
)


class FusionError(CollabError, ValueError):
    """A routing table, thought bank or setting FusionFactory cannot use; the message
    names the file, row or field and what was expected."""


@dataclasses.dataclass
class FusionRow:
    """One query of a routing table with the pool's responses."""

    id: str
    task: str
    prompt: str
    gold: str | None
    responses: dict[str, str]
    scores: dict[str, float]
    costs: dict[str, float]
    judge: dict[str, float] | None = None


# ------------------------------------------------------------------ reading
def read_fusion_table(path: str | os.PathLike[str], need_gold: bool = False) -> list[FusionRow]:
    """The rows of a routing table that holds responses (see the module docstring): a JSONL
    file, a RouteLLM CSV (its ``<model>_response`` columns), or ``routellm-gsm8k``, the shipped
    RouteLLM GSM8K table (Mixtral-8x7B and GPT-4 with their responses; gold answers from
    collab's GSM8K benchmark, matched by question).

    The canonical fields are checked as ``collab route train`` checks them; every row
    needs ``responses`` with a string for each expert it scores, and ``gold`` when
    ``need_gold``. Errors name the line and the field."""
    import warnings

    from collab.io import jsonl_rows
    from routers.table import RoutingTable, TableError, TableWarning

    if str(path) in ("routellm-gsm8k",) or str(path).endswith(".csv"):
        return _routellm_rows(path, need_gold)
    p = Path(path)
    if not p.is_file():
        raise FusionError(f"{p}: routing table not found (expected a .jsonl with responses, a RouteLLM .csv, or routellm-gsm8k)")
    raw: list[dict[str, Any]] = []
    lines: list[int] = []
    for n, row in jsonl_rows(p, FusionError):
        if not isinstance(row, dict):
            raise FusionError(f"{p}:{n}: expected a JSON object (a routing-table row), found {type(row).__name__}")
        raw.append(row)
        lines.append(n)
    if not raw:
        raise FusionError(f"{p}: the routing table is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TableWarning)
            table = RoutingTable.from_rows(raw, source=str(p))
    except TableError as e:
        raise FusionError(str(e)) from None
    out = []
    for i, (row, n) in enumerate(zip(raw, lines)):
        at = f"{p}:{n}"
        responses = row.get("responses")
        if not isinstance(responses, dict) or not responses:
            raise FusionError(
                f"{at}: field 'responses': expected {{expert: response text}}, found {responses!r} "
                "(collect a table with responses: collab eval SPEC --systems a,b --bench B --routing-table OUT --responses)"
            )
        for e in table.experts:
            if not isinstance(responses.get(e), str):
                raise FusionError(f"{at}: responses.{e}: expected a string (the expert's answer), found {responses.get(e)!r}")
        for e in responses:
            if e not in table.experts:
                raise FusionError(f"{at}: responses: unknown expert '{e}' (the row scores {', '.join(table.experts)})")
        gold = row.get("gold")
        if gold is not None and not isinstance(gold, str):
            gold = json.dumps(gold) if not isinstance(gold, (int, float)) else str(gold)
        if need_gold and (gold is None or not gold.strip()):
            raise FusionError(f"{at}: field 'gold': expected the reference answer (a non-empty string), found {row.get('gold')!r}")
        judge = row.get("judge")
        if judge is not None:
            if not isinstance(judge, dict) or set(judge) != set(table.experts):
                raise FusionError(f"{at}: field 'judge': expected {{expert: score}} for every expert ({', '.join(table.experts)}), found {judge!r}")
            judge = {e: _number(judge[e], f"{at}: judge.{e}") for e in table.experts}
        out.append(
            FusionRow(
                id=table.ids[i],
                task=table.tasks[i],
                prompt=table.prompts[i],
                gold=gold,
                responses={e: responses[e] for e in table.experts},
                scores={e: float(table.scores[i, j]) for j, e in enumerate(table.experts)},
                costs={e: float(table.costs[i, j]) for j, e in enumerate(table.experts)},
                judge=judge,
            )
        )
    return out


def table_file(ref: str | os.PathLike[str]) -> Path:
    """The file behind a table reference (a shorthand names a shipped file): what a run records the SHA-256 of."""
    from routers.table import ROUTING_DATA

    return ROUTING_DATA / "routellm" / "gsm8k_responses.csv" if str(ref) == "routellm-gsm8k" else Path(ref)


def table_name(ref: str | os.PathLike[str]) -> str:
    """How a run names its table: the shorthand, or the file's name."""
    return str(ref) if str(ref) == "routellm-gsm8k" else Path(ref).name


def _routellm_rows(ref: str | os.PathLike[str], need_gold: bool) -> list[FusionRow]:
    from routers.table import TableError, _read_csv, from_routellm_csv

    gsm8k = str(ref) == "routellm-gsm8k"
    p = table_file(ref)
    if not p.is_file():
        raise FusionError(f"{p}: RouteLLM CSV not found")
    try:
        table = from_routellm_csv(p, task="gsm8k" if gsm8k else p.stem)
    except TableError as e:
        raise FusionError(str(e)) from None
    raw = _read_csv(p)
    missing = [e for e in table.experts if f"{e}_response" not in raw[0]]
    if missing:
        raise FusionError(f"{p}: no '{missing[0]}_response' column: the CSV holds no responses for FusionFactory")
    golds: dict[str, str] = {}
    if gsm8k:
        from evals.benchmarks import get_benchmark

        golds = {_norm(ex.question): str(ex.gold) for ex in get_benchmark("gsm8k").examples()}
    out = []
    for i, r in enumerate(raw):
        gold = golds.get(_norm(table.prompts[i]))
        if need_gold and gold is None:
            raise FusionError(f"{p}: row {i + 2}: no gold answer (the question is not in collab's GSM8K test set)" if gsm8k else f"{p}: a RouteLLM CSV has no gold answers; distillation needs them")
        out.append(
            FusionRow(
                id=table.ids[i], task=table.tasks[i], prompt=table.prompts[i], gold=gold,
                responses={e: r[f"{e}_response"] or "" for e in table.experts},
                scores={e: float(table.scores[i, j]) for j, e in enumerate(table.experts)},
                costs={e: float(table.costs[i, j]) for j, e in enumerate(table.experts)},
            )
        )
    return out


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise FusionError(f"{where}: expected a number, found {v!r}")
    return float(v)


# --------------------------------------------------------------- selection
def top_responses(row: FusionRow, top: int = 3, pre: int = 5) -> list[str]:
    """The experts whose responses the summariser reads, best first: sorted by score
    (high first), then cost (low first), then name; with a judge, the first ``pre`` of
    those re-sorted by judge score (high first), then cost, then name; the first ``top``.
    Empty responses are skipped."""
    experts = [e for e in row.responses if row.responses[e].strip()]
    first = sorted(experts, key=lambda e: (-row.scores[e], row.costs[e], e))
    if row.judge is not None:
        judge = row.judge
        first = sorted(first[:pre], key=lambda e: (-judge[e], row.costs[e], e))
    return first[:top]


def distill_order(row: FusionRow, setting: str = "perf") -> list[str]:
    """The pool's responses in the order distillation takes them: by score then length
    (``perf``) or by judge then length (``judge``), both high (long) first, then name."""
    if setting == "judge":
        if row.judge is None:
            raise FusionError(f"row '{row.id}': setting 'judge' needs a 'judge' field ({{expert: score}}) in every row")
        judge = row.judge
        return sorted(row.responses, key=lambda e: (-judge[e], -len(row.responses[e]), e))
    return sorted(row.responses, key=lambda e: (-row.scores[e], -len(row.responses[e]), e))


@dataclasses.dataclass
class DistillExample:
    """One fine-tuning example: the query, the text to learn, and where it came from
    (``gold`` or the expert whose response it is)."""

    id: str
    prompt: str
    response: str
    source: str
    score: float | None = None


def distill_examples(rows: Sequence[FusionRow], k: int = 5, setting: str = "perf") -> list[DistillExample]:
    """The fine-tuning set of ``rows``: per query its gold answer once, then up to ``k``
    responses of the pool in ``distill_order``, stopping at the first response scored 0
    (so none scored 0 is ever taken); empty responses are skipped. ``setting='gold'`` is
    the baseline: the gold answers only, repeated in order to the size the ``perf``
    setting would give."""
    if setting not in SETTINGS:
        raise FusionError(f"setting: expected one of {', '.join(SETTINGS)}, found {setting!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FusionError(f"k: expected an integer >= 0, found {k!r}")
    out: list[DistillExample] = []
    for r in rows:
        if r.gold is None or not r.gold.strip():
            raise FusionError(f"row '{r.id}': no 'gold' answer; distillation needs one per query")
        out.append(DistillExample(r.id, r.prompt, r.gold, "gold"))
        if setting == "gold":
            continue
        taken = 0
        for e in distill_order(r, setting):
            if taken >= k or r.scores[e] <= 0.0:
                break
            if not r.responses[e].strip():
                continue
            out.append(DistillExample(f"{r.id}#{e}", r.prompt, r.responses[e], e, r.scores[e]))
            taken += 1
    if setting == "gold":
        golds = out
        size = len(distill_examples(rows, k, "perf"))
        out = [dataclasses.replace(golds[i % len(golds)], id=f"{golds[i % len(golds)].id}#{i // len(golds)}") for i in range(size)]
    return out


# -------------------------------------------------------------- prompts
def summariser_prompt(query: str, responses: Sequence[str]) -> str:
    """What the summariser is asked: the question, the selected responses (each cut to
    ``RESPONSE_CHARS``), and the three parts a thought template must have."""
    parts = [
        (
            "Read the question and the good solutions below. Write a short thought template that would help "
            "someone solve similar questions; it must be general enough to fit variations of the question.\n"
        ),
        f"Question: {query}\n",
        f"Good solutions ({len(responses)}):",
    ]
    for i, r in enumerate(responses, 1):
        text = r if len(r) <= RESPONSE_CHARS else r[:RESPONSE_CHARS] + "... [cut]"
        parts.append(f"Solution {i}:\n{text}\n")
    parts.append(
        "Write the template in 1 to 5 sentences:\n"
        "1. The kind of task and the general approach (one short sentence).\n"
        "2. The reasoning steps that solve it (1 to 3 sentences).\n"
        "3. The format the answer should take (one sentence).\n\n"
        "Thought template:"
    )
    return "\n".join(parts)


def thought_prompt(query: str, retrieved: Sequence[BankEntry], mode: str = "thought") -> str:
    """The target's user message: ``query`` alone without retrieved entries; otherwise
    the reference's layout (a header, ``Question{i}`` with ``Thought Template {i}``, or
    the gold ``Answer {i}`` in ``fewshot`` mode, then the question to solve)."""
    if not retrieved:
        return query
    if mode == "fewshot":
        head, label = "Here are some similar questions and their answers:", "Answer"
    else:
        head, label = "Here are some similar questions and guidelines in how to solve them:", "Thought Template"
    parts = [head + "\n"]
    for i, e in enumerate(retrieved, 1):
        body = e.gold if mode == "fewshot" else e.template
        parts.append(f"Question{i}: {e.prompt}\n")
        parts.append(f"{label} {i}: {body}\n")
    parts.append("Now, please solve the following question:\n")
    parts.append(query)
    if mode == "thought":
        parts.append("\nUse the thought templates above as guidance.")
    return "\n".join(parts)


# ------------------------------------------------------------- the bank
@dataclasses.dataclass
class BankEntry:
    """One query of a thought bank: its template and gold answer."""

    id: str
    task: str
    prompt: str
    gold: str | None
    template: str
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ThoughtBank:
    """Thought templates with their queries' embeddings (a directory written by
    ``build_thought_bank``); ``retrieve`` finds the nearest within a task."""

    entries: list[BankEntry]
    embeddings: np.ndarray
    config: dict[str, Any]
    path: Path | None = None
    _encoder: Any = None

    @property
    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.entries})

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from routers.encoders import make_encoder

            self._encoder = make_encoder(self.config.get("encoder", {"type": "minilm"}))
        return self._encoder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ThoughtBank:
        """Read a bank directory; errors name the file and what is wrong."""
        from safetensors.numpy import load_file

        d = Path(path)
        _, config = read_artefact_config(d, BANK_KIND, FusionError)
        entries = [_entry(row, f"{d / BANK_ENTRIES}:{n}") for n, row in _rows(d / BANK_ENTRIES)]
        tensors = d / BANK_TENSORS
        if not tensors.is_file():
            raise FusionError(f"{tensors}: not found")
        emb = load_file(str(tensors)).get("embeddings")
        if emb is None or emb.ndim != 2 or emb.shape[0] != len(entries):
            found = None if emb is None else tuple(emb.shape)
            raise FusionError(f"{tensors}: 'embeddings': expected shape ({len(entries)}, dim), one row per entry of {BANK_ENTRIES}, found {found}")
        return cls(entries, emb.astype(np.float32), config, d)

    def task_for(self, embedding: np.ndarray) -> str:
        """The task whose entries' mean embedding is nearest (cosine): the query's cluster
        when its task is unknown."""
        tasks = self.tasks
        if len(tasks) == 1:
            return tasks[0]
        names = np.array([e.task for e in self.entries])
        cents = np.stack([self.embeddings[names == t].mean(axis=0) for t in tasks])
        cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
        return tasks[int(np.argmax(cents @ embedding))]

    def retrieve(self, query: str, k: int = 3, task: str | None = None, embedding: np.ndarray | None = None) -> tuple[list[tuple[BankEntry, float]], str]:
        """The ``k`` entries most similar to ``query`` (cosine of the embeddings) within
        ``task`` (None: the nearest task's), most similar first, ties by id; an entry
        whose query is ``query`` itself (whitespace aside) is never returned. Also
        returns the task searched."""
        if k <= 0 or not self.entries:
            return [], task or ""
        if embedding is None:
            embedding = self.encoder.encode([query])[0]
        embedding = np.asarray(embedding, dtype=np.float32)
        embedding = embedding / max(float(np.linalg.norm(embedding)), 1e-12)  # cosine, whatever the encoder returns
        if task is None:
            task = self.task_for(embedding)
        elif task not in self.tasks:
            raise FusionError(f"task: the bank has no entries for task '{task}' (its tasks: {', '.join(self.tasks)})")
        sims = self.embeddings @ embedding
        own = _norm(query)
        cands = [i for i, e in enumerate(self.entries) if e.task == task and _norm(e.prompt) != own]
        cands.sort(key=lambda i: (-float(sims[i]), self.entries[i].id))
        return [(self.entries[i], float(sims[i])) for i in cands[:k]], task


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    from collab.io import jsonl_rows

    if not path.is_file():
        raise FusionError(f"{path}: not found")
    yield from jsonl_rows(path, FusionError)


def _entry(row: Any, at: str) -> BankEntry:
    if not isinstance(row, dict):
        raise FusionError(f"{at}: expected an object, found {type(row).__name__}")
    for key in ("id", "task", "prompt", "template"):
        if not isinstance(row.get(key), str):
            raise FusionError(f"{at}: field '{key}': expected a string, found {row.get(key)!r}")
    return BankEntry(row["id"], row["task"], row["prompt"], row.get("gold"), row["template"], list(row.get("sources") or []))


# ------------------------------------------------------------- building
def build_thought_bank(
    table: str | os.PathLike[str],
    summariser: BaseSystem,
    out: str | os.PathLike[str],
    *,
    summariser_ref: str,
    top: int = 3,
    pre: int = 5,
    max_tokens: int = 96,
    limit: int | None = None,
    batch_size: int = 8,
    encoder: Any = "minilm",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ThoughtBank:
    """Summarise the top responses of every row of ``table`` (the first ``limit``) into a
    thought template with ``summariser`` (greedy, ``max_tokens``) and write the bank to
    ``out`` atomically. Finished templates are kept in ``.OUT.partial.jsonl`` beside it,
    so an interrupted build resumes; a rerun with other settings refuses to.
    ``encoder`` is an encoder name that needs no fitting, or an encoder object (its
    ``config()`` is recorded and rebuilt by ``make_encoder`` when the bank loads)."""
    from safetensors.numpy import save_file

    from collab.io import atomic_directory, atomic_write_json, sha256_file
    from routers.encoders import make_encoder

    for name, v, lo in (("top", top, 1), ("pre", pre, 1), ("max_tokens", max_tokens, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise FusionError(f"{name}: expected an integer >= {lo}, found {v!r}")
    if isinstance(encoder, str) and "tfidf" in encoder:
        raise FusionError(f"encoder: expected one that needs no fitting (minilm, lm, lm@LAYERS), found {encoder!r}")
    if pre < top:
        raise FusionError(f"pre: expected at least top={top} (the responses re-sorted by the judge), found {pre}")
    out = Path(out)
    if out.exists() and not (overwrite and (out / BANK_CONFIG).is_file()):
        raise FusionError(f"{out}: already exists" + (" (pass --overwrite to replace it)" if (out / BANK_CONFIG).is_file() else " and is not a thought bank"))
    rows = read_fusion_table(table)
    if limit is not None:
        rows = rows[:limit]
    settings = {"source": {"name": table_name(table), "sha256": sha256_file(table_file(table))}, "summariser": summariser_ref, "top": top, "pre": pre, "max_tokens": max_tokens, "rows": len(rows)}
    partial = out.parent / f".{out.name}.partial.jsonl"
    done = _read_partial(partial, settings)
    todo = [r for r in rows if r.id not in done]
    if not partial.exists():
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
    with open(partial, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            chosen = [top_responses(r, top, pre) for r in batch]
            requests = [
                GenerationRequest(messages=[{"role": "user", "content": summariser_prompt(r.prompt, [r.responses[e] for e in c])}], max_tokens=max_tokens)
                for r, c in zip(batch, chosen)
            ]
            try:
                comps = summariser.generate_batch(requests)
            except RequestError as e:
                raise FusionError(
                    f"summarising {', '.join(r.id for r in batch)} of {table}: {e}; the summariser needs a longer context, or fewer responses "
                    f"per query (--top); the {len(done)} templates done so far are kept in {partial}"
                ) from e
            for r, c, comp in zip(batch, chosen, comps):
                rec = {
                    "id": r.id, "task": r.task, "prompt": r.prompt, "gold": r.gold, "template": comp.text.strip(),
                    "sources": [{"expert": e, "score": r.scores[e], "cost": r.costs[e]} for e in c],
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[r.id] = rec
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(len(rows) - len(todo) + start + len(batch), len(rows))
    entries = [_entry(done[r.id], str(partial)) for r in rows]
    enc = make_encoder(encoder) if isinstance(encoder, str) else encoder
    emb = np.asarray(enc.encode([e.prompt for e in entries]), dtype=np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    config = {
        "type": "thought_bank",
        "version": BANK_VERSION,
        "method": "FusionFactory thought level",
        "reference_url": REFERENCE_URL,
        **settings,
        "encoder": enc.config(),
        "entries": len(entries),
        "tasks": {t: sum(e.task == t for e in entries) for t in sorted({e.task for e in entries})},
        "empty_templates": sum(not e.template for e in entries),
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / BANK_ENTRIES).write_text("".join(json.dumps(dataclasses.asdict(e), ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
        save_file({"embeddings": np.ascontiguousarray(emb)}, str(tmp / BANK_TENSORS))
        atomic_write_json(tmp / BANK_CONFIG, config)
    partial.unlink()
    return ThoughtBank(entries, emb, config, out, enc)


def _read_partial(partial: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not partial.is_file():
        return {}
    lines = partial.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}
    if head.get("settings") != settings:
        raise FusionError(f"{partial}: an interrupted build with other settings or another table; rerun with the same ones to resume, or delete it to start over")
    done: dict[str, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # the last line of a killed run may be cut short
        done[rec["id"]] = rec
    return done


# ------------------------------------------------------------- the system
class ThoughtSystem(BaseSystem):
    """A target system whose prompts carry retrieved thought templates (or, in
    ``fewshot`` mode, retrieved questions with their gold answers).

    The last user message (or the raw prompt) is the query; with ``k = 0`` or nothing
    retrieved the request goes to the target unchanged. The trace lists what was
    retrieved, its similarity and the task searched."""

    def __init__(self, name: str, bank: ThoughtBank, target: BaseSystem, k: int = 3, mode: str = "thought", task: str | None = None) -> None:
        if mode not in MODES:
            raise FusionError(f"mode: expected one of {', '.join(MODES)}, found {mode!r}")
        if mode == "fewshot" and any(not e.gold for e in bank.entries):
            raise FusionError(f"{bank.path}: mode 'fewshot' needs every entry's gold answer; this bank's table had none for some rows")
        self.name = name
        self.bank = bank
        self.target = target
        self.k = k
        self.mode = mode
        self.task = task

    def augment(self, requests: Sequence[GenerationRequest]) -> list[tuple[GenerationRequest, dict[str, Any]]]:
        """Each request with the retrieved entries prepended, and what was retrieved."""
        queries = [r.text_for_routing(last_turn_only=True) for r in requests]
        embs = self.bank.encoder.encode(queries) if self.k > 0 else [None] * len(queries)
        out = []
        for req, q, emb in zip(requests, queries, embs):
            hits, task = self.bank.retrieve(q, self.k, self.task, embedding=emb) if self.k > 0 else ([], self.task or "")
            info = {"mode": self.mode, "task": task, "retrieved": [{"id": e.id, "similarity": round(s, 4)} for e, s in hits]}
            if not hits:
                out.append((req, info))
                continue
            text = thought_prompt(q, [e for e, _ in hits], self.mode)
            if req.prompt is not None:
                new = dataclasses.replace(req, prompt=text)
            else:
                assert req.messages is not None
                last = max(i for i, m in enumerate(req.messages) if m["role"] == "user") if any(m["role"] == "user" for m in req.messages) else len(req.messages) - 1
                msgs = [dict(m) for m in req.messages]
                msgs[last] = {**msgs[last], "content": text}
                new = dataclasses.replace(req, messages=msgs)
            out.append((new, info))
        return out

    def _trace(self, info: dict[str, Any], target_trace: dict[str, Any]) -> dict[str, Any]:
        return {"system": self.name, "type": "thought", **info, "target": getattr(self.target, "name", "target"), "target_trace": target_trace}

    def generate(self, request: GenerationRequest) -> Completion:
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        pairs = self.augment(requests)
        comps = self.target.generate_batch([r for r, _ in pairs])
        return [dataclasses.replace(c, trace=self._trace(info, c.trace)) for c, (_, info) in zip(comps, pairs)]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        new, info = self.augment([request])[0]
        for chunk in self.target.stream(new):
            if chunk.finish_reason is not None:
                chunk = dataclasses.replace(chunk, trace=self._trace(info, chunk.trace or {}))
            yield chunk


class ThoughtSystemType:
    """``type: thought`` in a spec: a thought bank, the target expert or system, ``k``
    (default 3), ``mode`` (thought or fewshot) and an optional fixed ``task``."""

    keys: ClassVar[frozenset[str]] = frozenset({"type", "bank", "target", "k", "mode", "task"})

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        spec.reject_unknown_keys(config, kp, "thought", self.keys)
        d = spec.require_dir(config, "bank", kp)
        try:
            bank = ThoughtBank.load(d)
        except FusionError as e:
            raise spec.error(f"{kp}.bank", str(e)) from e
        target = config.get("target")
        if not isinstance(target, str) or (target not in spec.experts and target not in spec.systems):
            raise spec.error(f"{kp}.target", f"expected the name of an expert or system of the spec, found {target!r}")
        if target == name:
            raise spec.error(f"{kp}.target", "a thought system cannot target itself")
        k = config.get("k", 3)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise spec.error(f"{kp}.k", f"expected an integer >= 0 (templates retrieved per query), found {k!r}")
        mode = config.get("mode", "thought")
        if mode not in MODES:
            raise spec.error(f"{kp}.mode", f"expected one of {', '.join(MODES)}, found {mode!r}")
        if mode == "fewshot" and any(not e.gold for e in bank.entries):
            raise spec.error(f"{kp}.mode", f"'fewshot' needs every entry's gold answer, and the bank {d} lacks some")
        task = config.get("task")
        if task is not None and task not in bank.tasks:
            raise spec.error(f"{kp}.task", f"the bank has no entries for task {task!r} (its tasks: {', '.join(bank.tasks)})")

    def build(self, spec: Any, name: str, config: dict[str, Any]) -> ThoughtSystem:
        bank = ThoughtBank.load(spec.resolve_path(config["bank"]))
        return ThoughtSystem(name, bank, spec.system(config["target"]), k=int(config.get("k", 3)), mode=config.get("mode", "thought"), task=config.get("task"))
