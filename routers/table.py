"""Routing tables: which expert answered which query how well, at what cost.

The canonical format (DESIGN.md) is JSONL, one query per line::

    {"id": "q1", "task": "math", "prompt": "...", "scores": {"a": 1.0, "b": 0.0}, "costs": {"a": 1.0, "b": 8.0}}

``RoutingTable`` holds it as arrays: ``scores`` and ``costs`` are (n, experts)
float64 matrices in the order of ``experts``. Converters read the RouteLLM CSVs
and the LLMRouter JSON shipped in ``routers/data/routing/``. Splits are by query id, stratified by task, seeded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from collab.errors import CollabError
from collab.io import jsonl_rows

#: The routing tables behind the ``--data`` shorthands, shipped inside the package
#: (routers/data/routing/, with their upstream licences; README.md there names the sources).
ROUTING_DATA = Path(__file__).resolve().parent / "data" / "routing"


class TableError(CollabError, ValueError):
    """A routing table that is not valid: names the file, line and field."""


class TableWarning(UserWarning):
    """Something about a valid table the user should know (e.g. costs defaulted to 1).
    ``collab route`` prints these as one ``warning:`` line on stderr."""


@dataclass
class RoutingTable:
    """Per-query expert scores and costs; rows share one ordered list of experts."""

    experts: list[str]
    ids: list[str]
    tasks: list[str]
    prompts: list[str]
    scores: np.ndarray  # (n, E) in [0, 1]
    costs: np.ndarray  # (n, E) >= 0
    source: str = "<memory>"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, e = len(self.ids), len(self.experts)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(n, e)
        self.costs = np.asarray(self.costs, dtype=np.float64).reshape(n, e)
        if not (len(self.tasks) == len(self.prompts) == n):
            raise TableError(f"{self.source}: ids, tasks and prompts differ in length ({n}, {len(self.tasks)}, {len(self.prompts)})")
        if len(set(self.experts)) != e:
            raise TableError(f"{self.source}: duplicate expert names in {self.experts}")

    # -------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def task_names(self) -> list[str]:
        return sorted(set(self.tasks))

    def subset(self, index: Sequence[int] | np.ndarray) -> "RoutingTable":
        """The rows at ``index`` (a new table sharing nothing mutable)."""
        idx = np.asarray(index, dtype=np.int64)
        return RoutingTable(
            experts=list(self.experts),
            ids=[self.ids[i] for i in idx],
            tasks=[self.tasks[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
            scores=self.scores[idx].copy(),
            costs=self.costs[idx].copy(),
            source=self.source,
            notes=list(self.notes),
        )

    def select_experts(self, names: Sequence[str]) -> "RoutingTable":
        """The same queries restricted to (and ordered as) ``names``."""
        missing = [n for n in names if n not in self.experts]
        if missing:
            raise TableError(f"{self.source}: the table has no expert '{missing[0]}' (its experts: {', '.join(self.experts)})")
        cols = [self.experts.index(n) for n in names]
        return RoutingTable(list(names), list(self.ids), list(self.tasks), list(self.prompts), self.scores[:, cols], self.costs[:, cols], self.source, list(self.notes))

    @staticmethod
    def concat(tables: Sequence["RoutingTable"]) -> "RoutingTable":
        """Rows of several tables over the same experts (ids must stay unique)."""
        if not tables:
            raise TableError("no routing tables given")
        experts = tables[0].experts
        for t in tables[1:]:
            if set(t.experts) != set(experts):
                raise TableError(f"{t.source}: experts {t.experts} differ from {tables[0].source}'s {experts}")
        tables = [t.select_experts(experts) for t in tables]
        out = RoutingTable(
            experts=list(experts),
            ids=[i for t in tables for i in t.ids],
            tasks=[x for t in tables for x in t.tasks],
            prompts=[x for t in tables for x in t.prompts],
            scores=np.concatenate([t.scores for t in tables]),
            costs=np.concatenate([t.costs for t in tables]),
            source="+".join(t.source for t in tables),
            notes=[n for t in tables for n in t.notes],
        )
        dup = _first_duplicate(out.ids)
        if dup is not None:
            raise TableError(f"{out.source}: query id '{dup}' appears in more than one table")
        return out

    def rows(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield {
                "id": self.ids[i],
                "task": self.tasks[i],
                "prompt": self.prompts[i],
                "scores": {e: float(self.scores[i, j]) for j, e in enumerate(self.experts)},
                "costs": {e: float(self.costs[i, j]) for j, e in enumerate(self.experts)},
            }

    def content_hash(self) -> str:
        """SHA-256 of the canonical rows: which data a router was trained on."""
        h = hashlib.sha256()
        for row in self.rows():
            h.update(json.dumps(row, sort_keys=True).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    # ---------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the canonical JSONL atomically."""
        from collab.io import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows()))

    @classmethod
    def load(cls, path: str | os.PathLike[str], experts: Sequence[str] | None = None) -> "RoutingTable":
        """Read and validate a canonical JSONL table.

        ``experts`` fixes the expected expert names; by default the first row's
        names are the table's. Raises TableError naming the line and field."""
        p = Path(path)
        if not p.is_file():
            raise TableError(f"{p}: routing table not found")
        rows: list[dict[str, Any]] = []
        for lineno, obj in jsonl_rows(p, TableError, lambda n: f"{p}: line {n}"):
            if not isinstance(obj, dict):
                raise TableError(f"{p}: line {lineno}: expected a JSON object, found {type(obj).__name__}")
            obj["_line"] = lineno
            rows.append(obj)
        if not rows:
            raise TableError(f"{p}: the routing table is empty")
        return cls.from_rows(rows, source=str(p), experts=experts)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], source: str = "<rows>", experts: Sequence[str] | None = None) -> "RoutingTable":
        """Validate canonical rows (dicts) into a table; errors name the row's line."""
        if not rows:
            raise TableError(f"{source}: no rows")
        names = list(experts) if experts is not None else list((rows[0].get("scores") or {}).keys())
        if not names:
            raise TableError(f"{source}: {_where(rows[0], 0)}: 'scores' is missing or empty (expected {{expert: score in [0, 1]}})")
        known = set(names)
        ids, tasks, prompts = [], [], []
        scores = np.zeros((len(rows), len(names)))
        costs = np.ones((len(rows), len(names)))
        missing_cost_rows = 0
        seen: dict[str, str] = {}
        for i, r in enumerate(rows):
            at = f"{source}: {_where(r, i)}"
            rid = r.get("id", str(i))
            if not isinstance(rid, (str, int)) or str(rid) == "":
                raise TableError(f"{at}: field 'id': expected a non-empty string, found {rid!r}")
            rid = str(rid)
            if rid in seen:
                raise TableError(f"{at}: duplicate query id '{rid}' (first at {seen[rid]})")
            seen[rid] = _where(r, i)
            prompt = r.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise TableError(f"{at}: field 'prompt': expected a non-empty string, found {prompt!r}")
            task = r.get("task") or "default"
            if not isinstance(task, str):
                raise TableError(f"{at}: field 'task': expected a string, found {task!r}")
            sc = r.get("scores")
            if not isinstance(sc, dict) or not sc:
                raise TableError(f"{at}: field 'scores': expected {{expert: score in [0, 1]}}, found {sc!r}")
            for name in sc:
                if name not in known:
                    raise TableError(f"{at}: scores: unknown expert '{name}' (table experts: {', '.join(names)})")
            for j, name in enumerate(names):
                if name not in sc:
                    raise TableError(f"{at}: scores: expert '{name}' is missing (every row needs all of: {', '.join(names)})")
                scores[i, j] = _unit_float(sc[name], f"{at}: scores.{name}")
            co = r.get("costs")
            if co is None or co == {}:
                missing_cost_rows += 1
            else:
                if not isinstance(co, dict):
                    raise TableError(f"{at}: field 'costs': expected {{expert: cost >= 0}}, found {co!r}")
                for name, v in co.items():
                    if name not in known:
                        raise TableError(f"{at}: costs: unknown expert '{name}' (table experts: {', '.join(names)})")
                    costs[i, names.index(name)] = _cost_float(v, f"{at}: costs.{name}")
                if set(co) != known:
                    missing_cost_rows += 1
            ids.append(rid)
            tasks.append(task)
            prompts.append(prompt)
        notes = []
        if missing_cost_rows:
            msg = f"{source}: {missing_cost_rows} of {len(rows)} rows give no cost for some experts; those costs default to 1"
            notes.append(msg)
            warnings.warn(msg, TableWarning, stacklevel=2)
        return cls(names, ids, tasks, prompts, scores, costs, source=source, notes=notes)

    # ------------------------------------------------------------- splits
    def split(self, test_size: float = 0.2, seed: int = 0, stratify: bool = True) -> tuple["RoutingTable", "RoutingTable"]:
        """(train, test) by query id, stratified by task, reproducible for a seed."""
        tr, te = split_indices(self.tasks if stratify else ["all"] * len(self), test_size, seed)
        return self.subset(tr), self.subset(te)

    def folds(self, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """k (train_index, val_index) folds, stratified by task."""
        return kfold_indices(self.tasks, k, seed)

    def leave_one_task_out(self) -> Iterator[tuple[str, "RoutingTable", "RoutingTable"]]:
        """(task, train on every other task, test on this task) for each task."""
        tasks = np.asarray(self.tasks)
        for t in self.task_names:
            yield t, self.subset(np.flatnonzero(tasks != t)), self.subset(np.flatnonzero(tasks == t))

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "queries": len(self),
            "experts": list(self.experts),
            "tasks": {t: int(sum(1 for x in self.tasks if x == t)) for t in self.task_names},
            "mean_score": {e: float(self.scores[:, j].mean()) for j, e in enumerate(self.experts)},
            "oracle": float(self.scores.max(axis=1).mean()),
        }


def _where(row: Mapping[str, Any], index: int) -> str:
    return f"line {row['_line']}" if "_line" in row else f"row {index}"


def _first_duplicate(xs: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for x in xs:
        if x in seen:
            return x
        seen.add(x)
    return None


def _unit_float(v: Any, where: str) -> float:
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, (int, float)):
        raise TableError(f"{where}: expected a number in [0, 1], found {v!r}")
    x = float(v)
    if math.isnan(x) or math.isinf(x):
        raise TableError(f"{where}: expected a number in [0, 1], found {v!r}")
    if not 0.0 <= x <= 1.0:
        raise TableError(f"{where}: expected a number in [0, 1], found {x}")
    return x


def _cost_float(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)) or math.isinf(float(v)) or float(v) < 0:
        raise TableError(f"{where}: expected a finite cost >= 0, found {v!r}")
    return float(v)


# ------------------------------------------------------------------ splits
def split_indices(groups: Sequence[str], test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) index arrays: each group contributes ``test_size`` of its rows."""
    if not 0.0 < test_size < 1.0:
        raise TableError(f"test_size: expected 0 < x < 1, found {test_size}")
    rng = np.random.default_rng(seed)
    g = np.asarray(groups)
    train, test = [], []
    for name in sorted(set(groups)):
        idx = np.flatnonzero(g == name)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_size))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def kfold_indices(groups: Sequence[str], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds: rows of each group dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    g = np.asarray(groups)
    fold_of = np.zeros(len(g), dtype=np.int64)
    offset = 0
    for name in sorted(set(groups)):
        idx = np.flatnonzero(g == name)
        rng.shuffle(idx)
        fold_of[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


# ------------------------------------------------------------- converters
#: RouteLLM's blended prices in $ per million tokens (RouteLLM paper, section 5:
#: GPT-4 $24.7, Mixtral-8x7B $0.24), used as per-token costs for its tables.
ROUTELLM_PRICES = {"gpt-4-1106-preview": 24.7, "mistralai/Mixtral-8x7B-Instruct-v0.1": 0.24}

#: Parameter counts (billions) of LLMRouter's nine models, a cost proxy when no prices are given.
LLMROUTER_PARAMS_B = {
    "llama3-chatqa-1.5-8b": 8.0,
    "qwen2.5-7b-instruct": 7.6,
    "llama3-chatqa-1.5-70b": 70.0,
    "llama-3.1-nemotron-51b-instruct": 51.0,
    "mistral-7b-instruct-v0.3": 7.2,
    "gemma-2-9b-it": 9.2,
    "llama-3.1-8b-instruct": 8.0,
    "codegemma-7b": 8.5,
    "llama-3.3-nemotron-super-49b-v1": 49.0,
}


def approx_tokens(text: str) -> int:
    """A tokenizer-free token count (about 4 characters or 0.75 words per token)."""
    return max(1, int(round(max(len(text) / 4.0, len(text.split()) / 0.75))))


def costs_from_prices(prompts: Sequence[str], experts: Sequence[str], prices: Mapping[str, float] | None, per: str = "token") -> tuple[np.ndarray, list[str]]:
    """(n, E) costs: ``price * approx_tokens(prompt)`` per token, or the price as a constant.

    Experts without a price cost 1 per query; the returned notes say so."""
    n, notes = len(prompts), []
    out = np.ones((n, len(experts)))
    prices = dict(prices or {})
    missing = [e for e in experts if e not in prices]
    if missing:
        notes.append(f"no cost given for {', '.join(missing)}; defaulting to 1 per query")
    toks = np.array([approx_tokens(p) for p in prompts], dtype=np.float64) if per == "token" else np.ones(n)
    for j, e in enumerate(experts):
        if e in prices:
            out[:, j] = float(prices[e]) * toks / (1e6 if per == "token" else 1.0)
    return out, notes


def _read_csv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _bool_score(v: str, where: str) -> float:
    s = v.strip().lower()
    if s in ("true", "1", "1.0"):
        return 1.0
    if s in ("false", "0", "0.0"):
        return 0.0
    raise TableError(f"{where}: expected True or False, found {v!r}")


def from_routellm_csv(path: str | os.PathLike[str], task: str, prices: Mapping[str, float] | None = ROUTELLM_PRICES, id_prefix: str | None = None) -> RoutingTable:
    """One RouteLLM CSV (``prompt`` + one True/False column per model; ``*_response`` columns ignored)."""
    p = Path(path)
    rows = _read_csv(p)
    if not rows:
        raise TableError(f"{p}: empty CSV")
    if "prompt" not in rows[0]:
        raise TableError(f"{p}: no 'prompt' column (found {', '.join(rows[0])})")
    experts = [c for c in rows[0] if c != "prompt" and not c.endswith("_response")]
    if not experts:
        raise TableError(f"{p}: no model columns besides 'prompt'")
    prompts, scores = [], np.zeros((len(rows), len(experts)))
    for i, r in enumerate(rows):
        if not (r["prompt"] or "").strip():
            raise TableError(f"{p}: row {i + 2}: empty prompt")
        prompts.append(r["prompt"])
        for j, e in enumerate(experts):
            scores[i, j] = _bool_score(r[e] or "", f"{p}: row {i + 2}, column '{e}'")
    costs, notes = costs_from_prices(prompts, experts, prices)
    prefix = id_prefix or task
    return RoutingTable(experts, [f"{prefix}-{i}" for i in range(len(rows))], [task] * len(rows), prompts, scores, costs, source=str(p), notes=[f"{p}: {n}" for n in notes])


def from_routellm_mmlu(directory: str | os.PathLike[str] | None = None, prices: Mapping[str, float] | None = ROUTELLM_PRICES) -> RoutingTable:
    """All ``mmlu_<subject>.csv`` files, task = the subject."""
    d = Path(directory) if directory else ROUTING_DATA / "routellm" / "mmlu"
    files = sorted(d.glob("mmlu_*.csv"))
    if not files:
        raise TableError(f"{d}: no mmlu_<subject>.csv files")
    tables = [from_routellm_csv(f, task=f.stem[len("mmlu_"):], prices=prices, id_prefix=f.stem) for f in files]
    out = RoutingTable.concat(tables)
    out.source = str(d)
    out.notes = sorted(set(out.notes))
    return out


def from_routellm_gsm8k(path: str | os.PathLike[str] | None = None, prices: Mapping[str, float] | None = ROUTELLM_PRICES) -> RoutingTable:
    return from_routellm_csv(Path(path) if path else ROUTING_DATA / "routellm" / "gsm8k_responses.csv", task="gsm8k", prices=prices)


_LATEX = re.compile(r"\\[a-zA-Z]+|\$[^$\s](?:[^$]{0,80}[^$\s])?\$")
_CODE = re.compile(r"^\s*(def |from |import |class )|\"\"\"|>>>|write a (python )?function", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def derive_task(question: str) -> str:
    """A task label from the question's text, for tables that have none (LLMRouter).

    Rules, first match wins: ``logic_grid`` (house puzzles), ``code``, ``math``
    (LaTeX), ``math_word`` (several numbers, a question), ``reading`` (a long
    passage), ``open_qa`` (a short question), ``completion`` (a sentence to finish)."""
    q = question.strip()
    if re.search(r"There are \d+ houses", q):
        return "logic_grid"
    if _CODE.search(q):
        return "code"
    if _LATEX.search(q):
        return "math"
    if len(_NUMBER.findall(q)) >= 2 and len(q) < 1200 and ("?" in q or re.search(r"\b(how many|how much|find|calculate)\b", q, re.I)):
        return "math_word"
    if len(q) > 400:
        return "reading"
    if q.endswith("?"):
        return "open_qa"
    return "completion"


def from_llmrouter(path: str | os.PathLike[str] | None = None, costs: str | Mapping[str, float] = "unit") -> RoutingTable:
    """LLMRouter's ``train.json``: a list of ``{"question", "scores", "cluster_id"?}``.

    The file has no task labels, so ``derive_task`` gives each question one.
    ``costs``: ``"unit"`` (1 per query, as the file has none), ``"params"``
    (parameter count in billions per query) or a mapping expert -> cost."""
    p = Path(path) if path else ROUTING_DATA / "llmrouter" / "train.json"
    if not p.is_file():
        raise TableError(f"{p}: LLMRouter file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TableError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list) or not data:
        raise TableError(f"{p}: expected a non-empty JSON list of {{question, scores}}")
    rows = []
    for i, x in enumerate(data):
        if not isinstance(x, dict) or "question" not in x or "scores" not in x:
            raise TableError(f"{p}: item {i}: expected {{'question', 'scores'}}, found keys {sorted(x) if isinstance(x, dict) else type(x).__name__}")
        rows.append({"id": f"llmrouter-{i}", "task": derive_task(str(x["question"])), "prompt": x["question"], "scores": x["scores"], "costs": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = RoutingTable.from_rows(rows, source=str(p))
    if costs == "unit":
        table.notes = [f"{p}: the file gives no costs; every expert costs 1 per query"]
    elif costs == "params":
        table.costs = np.tile([LLMROUTER_PARAMS_B.get(e, 1.0) for e in table.experts], (len(table), 1))
        table.notes = [f"{p}: costs are parameter counts in billions (the file gives none)"]
    else:
        table.costs, notes = costs_from_prices(table.prompts, table.experts, dict(costs), per="query")
        table.notes = [f"{p}: {n}" for n in notes]
    return table


#: Shorthand names accepted wherever a table path is expected (CLI ``--data``).
SHORTHANDS = {
    "llmrouter": lambda: from_llmrouter(costs="params"),
    "routellm-mmlu": lambda: from_routellm_mmlu(),
    "routellm-gsm8k": lambda: from_routellm_gsm8k(),
}


def load_table(ref: str | os.PathLike[str], experts: Sequence[str] | None = None) -> RoutingTable:
    """A table from a canonical JSONL path or a shorthand (``llmrouter``, ``routellm-mmlu``, ``routellm-gsm8k``)."""
    key = str(ref)
    if key in SHORTHANDS:
        t = SHORTHANDS[key]()
        return t.select_experts(experts) if experts is not None else t
    p = Path(key)
    if p.suffix == ".csv":
        return from_routellm_csv(p, task=p.stem)
    if p.suffix == ".json":
        return from_llmrouter(p)
    if not p.exists():
        raise TableError(f"{p}: routing table not found (expected a .jsonl file or one of: {', '.join(SHORTHANDS)})")
    return RoutingTable.load(p, experts=experts)


def load_tables(refs: Sequence[str | os.PathLike[str]]) -> RoutingTable:
    """Several tables over the same experts, concatenated."""
    tables = [load_table(r) for r in refs]
    return tables[0] if len(tables) == 1 else RoutingTable.concat(tables)
