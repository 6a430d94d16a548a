"""The evaluation runner: any System on any benchmark, batched, resumable.

``evaluate(system, "arc_easy", limit=100, out_dir="runs/smol-arc")`` scores the
first 100 examples and returns an ``EvalResult``. With ``out_dir`` every example
is appended to ``results.jsonl`` as soon as it is scored, and ``summary.json``
is rewritten atomically after each batch; running the same command again skips
the ids already there, so an interrupted run resumes where it stopped. Ctrl-C
ends a run cleanly: the finished examples stay in ``results.jsonl``,
``summary.json`` says ``interrupted`` with the counts, and ``EvalInterrupted``
(a ``collab.errors.Interrupted``) says how to resume.

Multiple-choice benchmarks are scored by log-likelihood when the system can
score text (``loglikelihood_batch`` or ``loglikelihood``), else by generating a
letter. Generation uses ``generate_batch`` where the system has it.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from collab.errors import CollabError, Interrupted, RequestError
from collab.io import atomic_write_json
from collab.stats import bootstrap_ci
from collab.system import BatchSystem, Completion, Scorer, System, scorer
from evals.benchmarks import Benchmark, Example, MultipleChoiceBenchmark, Scored, get_benchmark

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
MODES = ("auto", "generate", "loglikelihood")


class EvalRunError(CollabError):
    """A run that cannot proceed: a results directory from another run, a mode the system cannot do."""


class EvalInterrupted(Interrupted):
    """Ctrl-C during ``evaluate``: ``done`` of ``total`` examples are scored and,
    with an output directory, saved in ``out_dir`` (None: nothing was saved)."""

    def __init__(self, message: str, benchmark: str, system: str, done: int, total: int, out_dir: str | None) -> None:
        super().__init__(message)
        self.benchmark = benchmark
        self.system = system
        self.done = done
        self.total = total
        self.out_dir = out_dir


@dataclass
class EvalResult:
    """The outcome of one (system, benchmark) run: the headline score with its
    bootstrap 95% interval, every metric, token counts, time and the records."""

    benchmark: str
    system: str
    mode: str
    n: int
    score: float
    ci_low: float
    ci_high: float
    metrics: dict[str, dict[str, float]]
    tokens: dict[str, int]
    seconds: float
    limit: int | None
    complete: bool
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    #: What the answers cost where the system reports it (an ensemble's ``trace.cost``):
    #: the tokens every model read or wrote, and that over the answers' own tokens.
    cost: dict[str, float] | None = None
    out_dir: str | None = None
    total: int = 0
    interrupted: bool = False
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def status(self) -> str:
        """``complete``, ``interrupted`` (stopped by Ctrl-C) or ``running``."""
        return "complete" if self.complete else "interrupted" if self.interrupted else "running"

    def summary(self) -> dict[str, Any]:
        """The summary.json content (everything but the records); ``n`` of ``total`` examples are done."""
        d = asdict(self)
        d.pop("records")
        d.pop("interrupted")
        d["status"] = self.status
        return d


def system_name(system: System) -> str:
    return str(system.name)


def resolve_mode(system: Any, bench: Benchmark, mode: str = "auto") -> str:
    """``generate`` or ``loglikelihood`` for this system and benchmark."""
    if mode not in MODES:
        raise EvalRunError(f"mode: expected one of {', '.join(MODES)}, found {mode!r}")
    can_score = isinstance(system, Scorer)
    if not bench.multiple_choice:
        if mode == "loglikelihood":
            raise EvalRunError(f"benchmark '{bench.name}' is scored by generation; mode 'loglikelihood' does not apply")
        return "generate"
    if mode == "loglikelihood" and not can_score:
        raise EvalRunError(f"system '{system_name(system)}' cannot score text (no loglikelihood); use mode 'generate'")
    if mode == "auto":
        return "loglikelihood" if can_score else "generate"
    return mode


# ---------------------------------------------------------------- run directory
def read_results(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of ``results.jsonl``. A torn last line (a run killed mid-write)
    is dropped, and with ``repair`` cut from the file; a bad line elsewhere is an error."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records: list[dict[str, Any]] = []
    good_bytes = 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("expected an object with 'id'")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(min(good_bytes, len(raw)))
                break
            raise EvalRunError(f"{path}:{i + 1}: not a results record ({e})") from e
        records.append(rec)
        good_bytes += len(line) + 1
    return records


def _check_run_dir(out: Path, bench: str, system: str, mode: str) -> None:
    summary = out / SUMMARY
    found: dict[str, Any] | None = None
    if summary.exists():
        try:
            found = json.loads(summary.read_text(encoding="utf-8"))
        except ValueError as e:
            raise EvalRunError(f"{summary}: not valid JSON ({e}); move the directory away or pick another --out") from e
    else:
        recs = read_results(out / RESULTS)
        if recs:
            found = recs[0]
    if found is None:
        return
    for key, want in (("benchmark", bench), ("system", system), ("mode", mode)):
        if key in found and found[key] != want:
            raise EvalRunError(
                f"{out}: holds a run with {key} '{found[key]}', not '{want}' "
                f"(benchmark '{found.get('benchmark')}', system '{found.get('system')}'); choose another output directory"
            )


# ------------------------------------------------------------------- scoring
def _call_ll(system: Any, pairs: list[tuple[str, str]], batch_size: int) -> list[float]:
    return [float(ll) for ll, _ in scorer(system, "multiple-choice scoring").loglikelihood_batch(pairs, batch_size=batch_size)]


@runtime_checkable
class _Tokenized(Protocol):
    tokenizer: Any


def _count_tokens(system: Any, texts: Sequence[str]) -> int:
    """Tokens the texts cost a system with a tokenizer (a local expert); 0 where it has none."""
    if not isinstance(system, _Tokenized):
        return 0
    return sum(len(system.tokenizer(t).input_ids) for t in texts)


def _run_loglikelihood(system: Any, bench: MultipleChoiceBenchmark, batch: list[Example], batch_size: int) -> list[dict[str, Any]]:
    pairs: list[tuple[str, str]] = []
    spans = []
    for ex in batch:
        p = bench.pairs(ex)
        spans.append((len(pairs), len(pairs) + len(p)))
        pairs.extend(p)
    t0 = time.perf_counter()
    lls = _call_ll(system, pairs, batch_size)
    latency = (time.perf_counter() - t0) / len(batch)
    recs = []
    for ex, (a, b) in zip(batch, spans):
        scored = bench.score_loglikelihoods(ex, lls[a:b])
        n_tok = _count_tokens(system, [c + x for c, x in pairs[a:b]])
        pred = scored.detail["pred"]
        recs.append(
            _record(ex, bench.context(ex), (ex.choices or [""])[pred], scored, {"system": system_name(system), "mode": "loglikelihood"}, n_tok, 0, latency, "stop")
        )
    return recs


def _run_generate(system: Any, bench: Benchmark, batch: list[Example], max_tokens: int | None, pool: ThreadPoolExecutor) -> list[dict[str, Any]]:
    requests = [bench.request(ex, max_tokens=max_tokens) for ex in batch]
    t0 = time.perf_counter()
    comps: list[Any] | None = None
    if len(requests) > 1 and isinstance(system, BatchSystem):
        try:
            comps = list(system.generate_batch(requests))
        except RequestError:  # one bad request (e.g. too long): retry one by one below
            comps = None
    if comps is None:
        comps = [_generate_one(system, r) for r in requests]
    latency = (time.perf_counter() - t0) / len(batch)
    scores: list[Scored] = list(pool.map(lambda pair: bench.score(pair[0], pair[1].text), zip(batch, comps)))
    return [
        _record(ex, req.prompt if req.prompt is not None else "\n\n".join(m["content"] for m in req.messages or []), c.text, s, c.trace, c.usage.prompt_tokens, c.usage.completion_tokens, latency, c.finish_reason)
        for ex, req, c, s in zip(batch, requests, comps, scores)
    ]


def _generate_one(system: Any, request: Any) -> Any:
    """``system.generate``, with a request the system refuses (too long, ...) as an empty, scored answer."""
    try:
        return system.generate(request)
    except RequestError as e:
        return Completion(text="", finish_reason="error", trace={"system": system_name(system), "error": str(e)})


def _record(ex: Example, prompt: str, output: str, s: Scored, trace: dict[str, Any], p_tok: int, c_tok: int, latency: float, finish: str) -> dict[str, Any]:
    return {
        "id": ex.id,
        "prompt": prompt,
        "output": output,
        "score": float(s.score),
        "metrics": s.metrics,
        "detail": s.detail,
        "trace": trace,
        "tokens": {"prompt": int(p_tok), "completion": int(c_tok), "total": int(p_tok + c_tok)},
        "latency": round(latency, 4),
        "finish_reason": finish,
    }


# ------------------------------------------------------------------- summary
def summarize(records: list[dict[str, Any]], bench: Benchmark, system: str, mode: str, limit: int | None, total: int, seconds: float, out_dir: str | None, n_bootstrap: int = 1000) -> EvalResult:
    metric_names = bench.metric_names if mode == "loglikelihood" or not bench.multiple_choice else ("acc",)
    metrics: dict[str, dict[str, float]] = {}
    for m in metric_names:
        vals = [float(r["metrics"].get(m, r["score"])) for r in records]
        _, lo, hi = bootstrap_ci(vals, n_bootstrap)
        metrics[m] = {"mean": sum(vals) / len(vals) if vals else float("nan"), "ci_low": lo, "ci_high": hi}
    scores = [r["score"] for r in records]
    _, lo, hi = bootstrap_ci(scores, n_bootstrap)
    groups: dict[str, dict[str, float]] = {}
    for r in records:
        g = r.get("group")
        if g:
            d = groups.setdefault(g, {"n": 0, "sum": 0.0})
            d["n"] += 1
            d["sum"] += r["score"]
    groups = {g: {"n": d["n"], "score": d["sum"] / d["n"]} for g, d in sorted(groups.items())}
    tokens = {k: sum(int(r["tokens"][k]) for r in records) for k in ("prompt", "completion", "total")}
    return EvalResult(
        benchmark=bench.name,
        system=system,
        mode=mode,
        n=len(records),
        score=sum(scores) / len(scores) if scores else float("nan"),
        ci_low=lo,
        ci_high=hi,
        metrics=metrics,
        tokens=tokens,
        seconds=round(seconds, 3),
        limit=limit,
        complete=len(records) == total,
        groups=groups,
        cost=summarize_cost(records),
        out_dir=out_dir,
        total=total,
        records=records,
    )


def summarize_cost(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """The summed ``trace.cost.tokens`` of the records (the tokens all of a system's
    models read or wrote: members x tokens for an ensemble), per example and as a
    multiple of the answers' own tokens; None when no record reports a cost."""
    costed = [r for r in records if isinstance((r.get("trace") or {}).get("cost"), dict)]
    if not costed:
        return None
    total = sum(int(r["trace"]["cost"].get("tokens", 0)) for r in costed)
    own = sum(int(r["tokens"]["total"]) for r in costed)
    return {"tokens": total, "per_example": round(total / len(costed), 1), "ratio": round(total / own, 3) if own else float("nan")}


# -------------------------------------------------------------------- runner
def evaluate(
    system: Any,
    benchmark: str | Benchmark,
    limit: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    mode: str = "auto",
    max_tokens: int | None = None,
    progress: bool = True,
    score_workers: int = 2,
    n_bootstrap: int = 1000,
    resume_command: str | None = None,
) -> EvalResult:
    """Score ``system`` on the first ``limit`` examples of ``benchmark``.

    ``batch_size`` examples go to the system per call (``generate_batch`` /
    ``loglikelihood_batch``); ``batch_size=1`` asks one example at a time.
    ``mode`` is ``auto`` (log-likelihood for multiple choice when the system
    can score text), ``generate`` or ``loglikelihood``. With ``out_dir``, the
    run is written there as it goes and resumed from there.

    Ctrl-C (KeyboardInterrupt) stops the run after saving what is finished and
    raises ``EvalInterrupted``; its message names ``resume_command`` (the
    command line that resumes the run, as the CLI passes it) or, without one,
    the ``evaluate`` call.
    """
    bench = get_benchmark(benchmark)
    name = system_name(system)
    mode = resolve_mode(system, bench, mode)
    if limit is not None and limit < 1:
        raise EvalRunError(f"limit: expected a positive integer, found {limit}")
    if batch_size < 1:
        raise EvalRunError(f"batch_size: expected a positive integer, found {batch_size}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise EvalRunError(f"max_tokens: expected a positive integer, found {max_tokens!r}")
    examples = bench.examples(limit)
    done: dict[str, dict[str, Any]] = {}
    out = Path(out_dir) if out_dir is not None else None
    seconds_before = 0.0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_run_dir(out, bench.name, name, mode)
        all_ids = {ex.id for ex in bench.examples()}
        for i, rec in enumerate(read_results(out / RESULTS, repair=True)):
            if rec["id"] not in all_ids:
                raise EvalRunError(f"{out / RESULTS}:{i + 1}: id '{rec['id']}' is not an example of benchmark '{bench.name}'")
            done[rec["id"]] = rec
        if (out / SUMMARY).exists():
            try:
                seconds_before = float(json.loads((out / SUMMARY).read_text()).get("seconds", 0.0))
            except ValueError:
                seconds_before = 0.0
    todo = [ex for ex in examples if ex.id not in done]
    t0 = time.perf_counter()

    def current(final: bool = False) -> EvalResult:
        recs = [done[ex.id] for ex in examples if ex.id in done]
        spent = seconds_before + time.perf_counter() - t0
        return summarize(recs, bench, name, mode, limit, len(examples), spent, str(out) if out else None, n_bootstrap if final else 200)

    def save(res: EvalResult) -> None:
        if out is not None:
            atomic_write_json(out / SUMMARY, res.summary())

    save(current())
    pbar = _progress(progress, f"{bench.name} · {name}", len(examples), len(examples) - len(todo))
    results_file = open(out / RESULTS, "a", encoding="utf-8") if out is not None else None
    pool = ThreadPoolExecutor(max_workers=max(1, score_workers))
    interrupted = False
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            if mode == "loglikelihood":
                assert isinstance(bench, MultipleChoiceBenchmark)
                recs = _run_loglikelihood(system, bench, batch, batch_size)
            else:
                recs = _run_generate(system, bench, batch, max_tokens, pool)
            for ex, rec in zip(batch, recs):
                rec = {"benchmark": bench.name, "system": name, **rec}
                group = ex.meta.get("group") or ex.meta.get("skill")
                if group:
                    rec["group"] = group
                if results_file is not None:  # written before it counts as done: the summary never claims more than the file
                    results_file.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                done[ex.id] = rec
            if results_file is not None:
                results_file.flush()
                os.fsync(results_file.fileno())
                save(current())
            if pbar is not None:
                pbar.advance(len(batch))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=interrupted)
        if results_file is not None:
            results_file.close()
        if pbar is not None:
            pbar.close()
    if interrupted:
        result = current(final=True)
        result.interrupted = True
        save(result)
        raise _interrupted(result, out, resume_command) from None
    result = current(final=True)
    save(result)
    return result


def _interrupted(res: EvalResult, out: Path | None, resume_command: str | None) -> EvalInterrupted:
    what = f"'{res.system}' on '{res.benchmark}' stopped by Ctrl-C after {res.n} of {res.total} examples"
    if out is not None:
        how = resume_command or f"evaluate(system, {res.benchmark!r}, out_dir={str(out)!r}, ...) again"
        msg = f"{what}; {res.n} saved in {out / RESULTS} (summary.json status 'interrupted'); resume with: {how}"
    else:
        how = f"{resume_command} --out DIR" if resume_command else "evaluate(..., out_dir=DIR)"
        msg = f"{what}; nothing was saved (no output directory); to make a run resumable, give one: {how}"
    return EvalInterrupted(msg, res.benchmark, res.system, res.n, res.total, str(out) if out is not None else None)


class _Bar:
    def __init__(self, description: str, total: int, completed: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        self._p = Progress(*columns, console=Console(stderr=True), transient=False)
        self._p.start()
        self._task = self._p.add_task(description, total=total, completed=completed)

    def advance(self, n: int) -> None:
        self._p.advance(self._task, n)

    def close(self) -> None:
        self._p.stop()


def _progress(enabled: bool, description: str, total: int, completed: int) -> _Bar | None:
    return _Bar(description, total, completed) if enabled else None
