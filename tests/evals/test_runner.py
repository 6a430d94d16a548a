from __future__ import annotations

import json
from pathlib import Path

import pytest

from collab.errors import CollabError, Interrupted, RequestError
from collab.stats import bootstrap_ci
from collab.system import BaseSystem, Completion, GenerationRequest, Usage
from evals.benchmarks import Benchmark, Example, Scored, register_benchmark
from evals.runner import EvalInterrupted, evaluate, read_results


class _Arith(Benchmark):
    name = "test:arith"
    metric_names = ("exact_match",)

    def load_examples(self) -> list[Example]:
        return [Example(id=f"q{i}", question=f"{i}+1", gold=str(i + 1)) for i in range(10)]

    def messages(self, example: Example) -> list[dict[str, str]]:
        return [{"role": "user", "content": example.question}]

    def score(self, example: Example, output: str) -> Scored:
        v = float(output.strip() == example.gold)
        return Scored(v, {"exact_match": v})


register_benchmark("test:arith", _Arith, replace=True)


class Calculator(BaseSystem):
    """Answers 'a+b' right except for odd a; can be made to crash after n calls."""

    def __init__(self, name: str = "calc", crash_after: int | None = None) -> None:
        self.name = name
        self.calls = 0
        self.batches: list[int] = []
        self.crash_after = crash_after

    def generate(self, request: GenerationRequest) -> Completion:
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("simulated interruption")
        content = request.messages[0]["content"]
        if "+" not in content:
            return Completion(text="B", usage=Usage(len(content.split()), 1), trace={"system": self.name})
        a, b = content.split("+")
        ans = int(a) + int(b) + (int(a) % 2)
        return Completion(text=str(ans), usage=Usage(3, 1), trace={"system": self.name})

    def generate_batch(self, requests):  # noqa: ANN001, ANN201
        self.batches.append(len(requests))
        return [self.generate(r) for r in requests]


def test_generation_run_scores_and_writes(tmp_path: Path) -> None:
    sysm = Calculator()
    res = evaluate(sysm, "test:arith", out_dir=tmp_path / "run", batch_size=4, progress=False)
    assert res.n == 10 and res.score == pytest.approx(0.5) and res.complete
    assert 0.0 <= res.ci_low < 0.5 < res.ci_high <= 1.0
    assert sysm.batches == [4, 4, 2]
    assert res.tokens == {"prompt": 30, "completion": 10, "total": 40}
    recs = read_results(tmp_path / "run" / "results.jsonl")
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(10)]
    r0 = recs[0]
    for key in ("id", "prompt", "output", "score", "trace", "tokens", "latency"):
        assert key in r0
    assert r0["prompt"] == "0+1" and r0["output"] == "1" and r0["score"] == 1.0 and recs[1]["score"] == 0.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["benchmark"] == "test:arith" and summary["system"] == "calc" and summary["status"] == "complete"
    assert summary["score"] == pytest.approx(0.5) and summary["limit"] is None


def test_limit_takes_first_n_and_batch_size_one_is_unbatched() -> None:
    sysm = Calculator()
    res = evaluate(sysm, "test:arith", limit=3, batch_size=1, progress=False)
    assert [r["id"] for r in res.records] == ["q0", "q1", "q2"] and sysm.batches == []


def test_ctrl_c_saves_what_is_done_marks_interrupted_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = f"collab eval spec.yaml --system calc --bench test:arith --out {out}"
    with pytest.raises(Interrupted) as info:
        evaluate(Calculator(crash_after=6), "test:arith", out_dir=out, batch_size=2, progress=False, resume_command=cmd)
    err = info.value
    assert isinstance(err, EvalInterrupted) and err.exit_code == 130 and (err.done, err.total) == (6, 10)
    msg = str(err)
    assert "'calc' on 'test:arith' stopped by Ctrl-C after 6 of 10 examples" in msg and f"6 saved in {out / 'results.jsonl'}" in msg
    assert msg.endswith(f"resume with: {cmd}")
    # The three finished batches are whole lines; the fourth batch, cut short, left nothing.
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["id"] for line in text.splitlines()] == [f"q{i}" for i in range(6)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["n"] == 6 and summary["total"] == 10 and summary["complete"] is False
    assert summary["score"] == pytest.approx(0.5)
    # A torn write of the next line (a kill, not Ctrl-C) is dropped and cut from the file.
    with open(out / "results.jsonl", "a") as f:
        f.write('{"id": "q6", "pro')
    again = Calculator()
    res = evaluate(again, "test:arith", out_dir=out, batch_size=2, progress=False)
    assert again.calls == 4 and res.n == 10 and res.complete and res.score == pytest.approx(0.5)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [f"q{i}" for i in range(10)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["n"] == summary["total"] == 10


def test_ctrl_c_without_output_directory_says_nothing_was_saved() -> None:
    with pytest.raises(EvalInterrupted) as info:
        evaluate(Calculator(crash_after=3), "test:arith", batch_size=1, progress=False, resume_command="collab eval s.yaml --bench test:arith")
    msg = str(info.value)
    assert "stopped by Ctrl-C after 3 of 10 examples" in msg and "nothing was saved" in msg
    assert msg.endswith("collab eval s.yaml --bench test:arith --out DIR") and info.value.out_dir is None


def test_ctrl_c_during_routing_collection_names_the_run_and_resumes(tmp_path: Path) -> None:
    from evals.routing import collect_routing_table

    table = tmp_path / "table.jsonl"
    systems = {"a": Calculator("a"), "b": Calculator("b", crash_after=5)}
    with pytest.raises(Interrupted) as info:
        collect_routing_table(systems, ["a", "b"], ["test:arith"], table, batch_size=5, resume_command="collab eval s.yaml --routing-table t.jsonl")
    msg = str(info.value)
    assert info.value.exit_code == 130 and "stopped by Ctrl-C: 'b' on 'test:arith' after 5 of 10 examples" in msg
    assert str(tmp_path / "table.jsonl.runs" / "test-arith" / "b") in msg and msg.endswith("resume with: collab eval s.yaml --routing-table t.jsonl")
    assert not table.exists()
    runs = tmp_path / "table.jsonl.runs" / "test-arith"
    assert json.loads((runs / "a" / "summary.json").read_text())["status"] == "complete"
    assert json.loads((runs / "b" / "summary.json").read_text())["status"] == "interrupted"
    systems = {"a": Calculator("a"), "b": Calculator("b")}
    info2 = collect_routing_table(systems, ["a", "b"], ["test:arith"], table, batch_size=5)
    assert info2["rows"] == 10 and systems["a"].calls == 0 and systems["b"].calls == 5


def test_results_dir_of_another_run_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    evaluate(Calculator(), "test:arith", limit=2, out_dir=out, progress=False)
    with pytest.raises(CollabError, match="system 'calc'.*not 'other'|system 'calc'"):
        evaluate(Calculator(name="other"), "test:arith", limit=2, out_dir=out, progress=False)
    with pytest.raises(CollabError, match="benchmark"):
        evaluate(Calculator(), "gsm8k", limit=2, out_dir=out, progress=False)


def test_unknown_benchmark_and_bad_limit() -> None:
    with pytest.raises(CollabError, match="known:"):
        evaluate(Calculator(), "nope", progress=False)
    with pytest.raises(CollabError, match="limit"):
        evaluate(Calculator(), "test:arith", limit=0, progress=False)


@pytest.mark.parametrize("bad", [0, -5])
def test_max_tokens_must_be_positive(bad: int) -> None:
    sysm = Calculator()
    with pytest.raises(CollabError, match=rf"max_tokens: expected a positive integer, found {bad}"):
        evaluate(sysm, "test:arith", limit=1, max_tokens=bad, progress=False)
    assert sysm.calls == 0


def test_max_tokens_reaches_the_request() -> None:
    from evals.benchmarks import get_benchmark

    bench = get_benchmark("test:arith")
    ex = bench.examples(1)[0]
    assert bench.request(ex).max_tokens == bench.max_tokens and bench.request(ex, max_tokens=1).max_tokens == 1
    with pytest.raises(RequestError, match="max_tokens"):  # 0 is not "the benchmark's default"
        bench.request(ex, max_tokens=0)


def test_bootstrap_interval() -> None:
    mean, lo, hi = bootstrap_ci([1.0] * 50 + [0.0] * 50)
    assert mean == 0.5 and 0.38 < lo < 0.45 and 0.55 < hi < 0.62
    assert bootstrap_ci([1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([1.0] * 50 + [0.0] * 50, level=0.5)[1] > lo  # a narrower level, a narrower interval


def test_multiple_choice_loglikelihood_batched_equals_unbatched(tiny_a) -> None:  # noqa: ANN001
    a = evaluate(tiny_a, "arc_easy", limit=6, batch_size=4, progress=False)
    b = evaluate(tiny_a, "arc_easy", limit=6, batch_size=1, progress=False)
    assert a.mode == "loglikelihood" and a.n == 6
    assert [r["detail"]["pred"] for r in a.records] == [r["detail"]["pred"] for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert ra["detail"]["loglikelihoods"] == pytest.approx(rb["detail"]["loglikelihoods"], abs=1e-2)
    # The scores equal the expert's own log-likelihoods of each choice.
    from evals.benchmarks import get_benchmark

    arc = get_benchmark("arc_easy")
    ex = arc.examples(1)[0]
    lls = [tiny_a.loglikelihood(c, x) for c, x in arc.pairs(ex)]
    assert a.records[0]["detail"]["pred"] == max(range(4), key=lambda i: lls[i])
    assert set(a.metrics) == {"acc", "acc_norm"} and a.tokens["prompt"] > 0


def test_generation_mode_on_a_real_model(tiny_a) -> None:  # noqa: ANN001
    res = evaluate(tiny_a, "gsm8k", limit=3, max_tokens=8, batch_size=3, progress=False)
    assert res.n == 3 and res.mode == "generate"
    assert all(r["tokens"]["completion"] <= 8 and r["tokens"]["prompt"] > 20 for r in res.records)
    assert all(r["trace"]["expert"] == "tiny-a" for r in res.records)
    letters = evaluate(tiny_a, "arc_easy", limit=2, mode="generate", max_tokens=4, progress=False)
    assert letters.mode == "generate" and "Answer with the letter" in letters.records[0]["prompt"]


def test_loglikelihood_mode_requires_a_scoring_system() -> None:
    with pytest.raises(CollabError, match="cannot score"):
        evaluate(Calculator(), "arc_easy", limit=1, mode="loglikelihood", progress=False)
    res = evaluate(Calculator(), "arc_easy", limit=1, progress=False)  # auto -> letters by generation
    assert res.mode == "generate"
