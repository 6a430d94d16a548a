"""Export a collab benchmark as a local lm-evaluation-harness task, with the
same examples, the same prompt and the same scorer, so that lm-eval (through
the ``collab`` model type) and ``evals.evaluate`` can be compared like for like.

    from evals.lm_eval_tasks import write_task
    task = write_task("arc_easy", "tasks/", limit=100)   # -> "collab_arc_easy"
    # collab-lm-eval --model collab --model_args spec=zoo:smollm2-135m-instruct \\
    #     --include_path tasks/ --tasks collab_arc_easy

Multiple-choice benchmarks become ``multiple_choice`` tasks (context and
choices exported verbatim; lm-eval's own ``acc``/``acc_norm``). Generation
benchmarks become ``generate_until`` tasks whose ``process_results`` calls the
collab scorer; run them with ``--apply_chat_template`` so the adapter receives
the same chat message that collab's runner sends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from collab.errors import CollabError
from collab.io import atomic_write_text
from evals.benchmarks import MultipleChoiceBenchmark, get_benchmark

_UTILS = '''"""Written by evals.lm_eval_tasks: score with the collab benchmark's own scorer."""
from functools import lru_cache

from evals.benchmarks import get_benchmark


@lru_cache(maxsize=None)
def _examples(name):
    return {e.id: e for e in get_benchmark(name).examples()}


def process_results(doc, results):
    bench = get_benchmark(doc["benchmark"])
    return {"score": float(bench.score(_examples(doc["benchmark"])[doc["id"]], results[0]).score)}
'''


def task_name(benchmark: str) -> str:
    return "collab_" + benchmark.replace(":", "_").replace("-", "_")


def write_task(benchmark: str, out_dir: str | os.PathLike[str], limit: int | None = None, max_tokens: int | None = None) -> str:
    """Write ``<task>.yaml``, ``<task>.jsonl`` (and ``utils.py``) to ``out_dir``; return the task name.
    ``max_tokens`` overrides a generation benchmark's length, as ``evaluate(max_tokens=...)`` does."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise CollabError(f"max_tokens: expected a positive integer, found {max_tokens!r}")
    bench = get_benchmark(benchmark)
    name = task_name(bench.name)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    rows = []
    for ex in bench.examples(limit):
        row = {"benchmark": bench.name, "id": ex.id}
        if isinstance(bench, MultipleChoiceBenchmark):
            d = bench.target_delimiter
            row.update(context=bench.context(ex), choices=[c[len(d) :] if c.startswith(d) else c for c in bench.continuations(ex)], gold=int(ex.gold))
        else:
            msgs = bench.messages(ex)
            if len(msgs) != 1 or msgs[0]["role"] != "user":
                raise CollabError(f"benchmark '{bench.name}': only one-message prompts export to lm-eval, found {len(msgs)} messages")
            row["user"] = msgs[0]["content"]
        rows.append(row)
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    head = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
    ]
    if isinstance(bench, MultipleChoiceBenchmark):
        body = [
            "output_type: multiple_choice",
            "doc_to_text: context",
            "doc_to_choice: choices",
            "doc_to_target: gold",
            f"target_delimiter: {json.dumps(bench.target_delimiter)}",
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        ]
    else:
        atomic_write_text(out / "utils.py", _UTILS)
        gen = {"until": list(bench.stop) or ["\x00never\x00"], "max_gen_toks": bench.max_tokens if max_tokens is None else max_tokens, "do_sample": False}
        body = [
            "output_type: generate_until",
            "doc_to_text: user",
            "doc_to_target: id",
            f"generation_kwargs: {json.dumps(gen)}",
            "process_results: !function utils.process_results",
            "metric_list:",
            "  - {metric: score, aggregation: mean, higher_is_better: true}",
        ]
    atomic_write_text(out / f"{name}.yaml", "\n".join(head + body + ["metadata: {version: 1.0}"]) + "\n")
    return name
