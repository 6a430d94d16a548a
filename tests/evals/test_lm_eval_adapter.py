from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_scores_match_collab_runner(tmp_path: Path, tiny_a) -> None:  # noqa: ANN001
    from evals.lm_eval_adapter import CollabLM
    from evals.lm_eval_tasks import write_task
    from evals.runner import evaluate

    mc = write_task("arc_easy", tmp_path, limit=8)
    gen = write_task("gsm8k", tmp_path, limit=2, max_tokens=24)
    ours_mc = evaluate(tiny_a, "arc_easy", limit=8, progress=False)
    ours_gen = evaluate(tiny_a, "gsm8k", limit=2, max_tokens=24, progress=False)
    from lm_eval.tasks import TaskManager

    lm = CollabLM(system=tiny_a, batch_size=4)
    # collab scores choices after the raw context, and generates from a chat message.
    res = lm_eval.simple_evaluate(model=lm, tasks=[mc], task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    out = lm_eval.simple_evaluate(model=lm, tasks=[gen], task_manager=TaskManager(include_path=str(tmp_path)), apply_chat_template=True, log_samples=True)
    res.update(out["results"])
    assert res[mc]["acc,none"] == pytest.approx(ours_mc.metrics["acc"]["mean"])
    assert res[mc]["acc_norm,none"] == pytest.approx(ours_mc.metrics["acc_norm"]["mean"])
    assert res[gen]["score,none"] == pytest.approx(ours_gen.score)
    # Same prompt, same greedy outputs through the adapter as through the runner.
    theirs = [s["resps"][0][0] for s in sorted(out["samples"][gen], key=lambda s: s["doc_id"])]
    assert theirs == [r["output"] for r in ours_gen.records]


def test_adapter_rolling_loglikelihood(tiny_a) -> None:  # noqa: ANN001
    from lm_eval.api.instance import Instance

    from evals.lm_eval_adapter import CollabLM

    lm = CollabLM(system=tiny_a)
    text = "The capital of France is Paris."
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    assert lm.loglikelihood_rolling([req])[0] == pytest.approx(tiny_a.loglikelihood_rolling(text))
    ll = Instance(request_type="loglikelihood", doc={}, arguments=("The capital of France is", " Paris."), idx=0)
    assert lm.loglikelihood([ll])[0][0] == pytest.approx(tiny_a.loglikelihood("The capital of France is", " Paris."), abs=1e-4)


def test_lm_eval_command_line_finds_the_collab_model(tmp_path: Path, long_tiny_dir: Path) -> None:
    from evals.lm_eval_tasks import write_task

    task = write_task("piqa", tmp_path / "tasks", limit=3)
    cmd = [
        sys.executable, "-m", "evals.lm_eval_cli", "--model", "collab", "--model_args", f"spec={long_tiny_dir}",
        "--include_path", str(tmp_path / "tasks"), "--tasks", task, "--output_path", str(tmp_path / "out"),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert files, p.stdout[-1000:]
    acc = json.loads(files[0].read_text())["results"][task]["acc,none"]
    assert 0.0 <= acc <= 1.0


@pytest.mark.slow
def test_smollm2_loglikelihoods_match_lm_eval_hflm() -> None:
    """An independent scorer: lm-eval's own Hugging Face model class (its
    tokenisation, context/continuation split, batching and log-softmax) on the
    same de-quantised SmolLM2 weights, request by request, against collab's
    packed scoring through the runner and through the adapter."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from collab.experts import Expert
    from evals.benchmarks import get_benchmark
    from evals.lm_eval_adapter import CollabLM
    from evals.runner import evaluate

    smol = Expert.load("zoo:smollm2-135m-instruct")
    assert next(smol.model.parameters()).dtype == torch.float32
    arc = get_benchmark("arc_easy")
    examples = arc.examples(10)
    pairs = [p for ex in examples for p in arc.pairs(ex)]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    hf = HFLM(pretrained=smol.model, tokenizer=smol.tokenizer, batch_size=8)
    theirs = hf.loglikelihood(requests, disable_tqdm=True)
    adapter = CollabLM(system=smol, batch_size=8).loglikelihood(requests)
    run = evaluate(smol, "arc_easy", limit=10, progress=False)
    ours = [ll for r in run.records for ll in r["detail"]["loglikelihoods"]]  # rounded to 4 decimals
    assert len(theirs) == len(adapter) == len(ours) == len(pairs) >= 30
    assert [ll for ll, _ in adapter] == pytest.approx([ll for ll, _ in theirs], abs=1e-3)
    assert ours == pytest.approx([ll for ll, _ in theirs], abs=1e-3)
    assert [g for _, g in adapter] == [g for _, g in theirs]  # greedy flags agree too
    # The picked answers agree, so accuracies would too.
    preds, start = [], 0
    for ex in examples:
        k = len(arc.pairs(ex))
        preds.append(max(range(k), key=lambda i: theirs[start + i][0]))
        start += k
    assert preds == [r["detail"]["pred"] for r in run.records]
