"""Choosing eta on validation data (``collab decode tune``), as the reference does.

1. The co-decoder that never defers (the base, with its LoRA if one was trained)
   answers every validation question greedily; the deferral head's g_t at each
   of its tokens gives the distribution of g on this data.
2. For each target deferral rate r (0, 0.1, ..., 1 by default) the threshold is
   the quantile of g above which a share r of those tokens lies.
3. The co-decoder answers the validation set at each threshold; the answers are
   scored, and the actual deferral rate and each expert's token share recorded.
4. The chosen threshold (``pick``): ``best``, the highest accuracy (ties go to
   the lower deferral rate); or ``cheapest``, the lowest deferral rate whose
   accuracy lies within the best point's 95% bootstrap interval, i.e. the
   cheapest threshold the validation set cannot tell from the best.

Validation data: a registered generation benchmark (``--bench skill:mixed-dev``)
or the dev split of a zoo skill (``dev:arith``, ``dev:lists``, ``dev:units``,
``dev:mixed``; disjoint from the skills' training and test questions). The curve
is written as JSON and PNG.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from collab.errors import CollabError
from collab.system import GenerationRequest

if TYPE_CHECKING:
    from decoding.system import CoLLMDecoder

DEFAULT_RATES = tuple(round(0.1 * i, 1) for i in range(11))
PICKS = ("best", "cheapest")


@dataclass
class ValidationItem:
    id: str
    request: GenerationRequest
    score: Callable[[str], float]


def validation_set(name: str, limit: int | None = None) -> list[ValidationItem]:
    """``dev:SKILL`` (a zoo skill's dev split) or a registered generation benchmark."""
    if name.startswith("dev:"):
        from collab import skills

        skill = name[4:]
        n = limit or 100
        if skill == "mixed":
            drawn = skills.mixed_dev_set(-(-n // len(skills.SKILLS)))[:n]
        elif skill in skills.SKILLS:
            drawn = skills.dev_set(skill, n)
        else:
            raise CollabError(f"{name}: unknown skill; expected dev:{', dev:'.join(['mixed', *skills.SKILLS])}")
        return [
            ValidationItem(e.id, GenerationRequest.chat(e.question, max_tokens=32), lambda out, e=e: skills.check(e.skill, out, e.answer))
            for e in drawn
        ]
    from evals.benchmarks import get_benchmark

    bench = get_benchmark(name)
    if bench.multiple_choice:
        raise CollabError(f"--bench {name}: a multiple-choice benchmark; tuning needs a generation benchmark")
    return [ValidationItem(ex.id, bench.request(ex), lambda out, ex=ex: bench.score(ex, out).score) for ex in bench.examples(limit)]


@dataclass
class CurvePoint:
    """The co-decoder at one threshold on the validation set."""

    target_rate: float | None
    threshold: float
    accuracy: float
    ci_low: float
    ci_high: float
    deferral_rate: float
    tokens: int
    tokens_by_expert: dict[str, int] = field(default_factory=dict)


@dataclass
class TuneResult:
    data: str
    examples: int
    points: list[CurvePoint]
    best: CurvePoint
    cheapest: CurvePoint
    pick: str
    g_quantiles: dict[str, float]

    @property
    def chosen(self) -> CurvePoint:
        return self.best if self.pick == "best" else self.cheapest

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chosen": asdict(self.chosen)}


def thresholds_for_rates(g: Sequence[float], rates: Sequence[float]) -> list[float]:
    """For each target rate r, the threshold eta: the smallest value of ``g`` with a
    share of at most r of ``g`` strictly above it (1.0 for r = 0: never defer; 0.0
    for r = 1: always)."""
    import bisect

    values = sorted(g)
    n = len(values)
    out = []
    for r in rates:
        if r <= 0 or not n:
            out.append(1.0)
        elif r >= 1:
            out.append(0.0)
        else:
            out.append(float(next(v for v in values if n - bisect.bisect_right(values, v) <= r * n + 1e-9)))
    return out


def _run(decoder: "CoLLMDecoder", items: Sequence[ValidationItem], threshold: float) -> tuple[CurvePoint, list[float]]:
    from collab.stats import bootstrap_ci

    decoder.threshold = threshold
    done = decoder.generate_batch([it.request for it in items])
    scores = [float(it.score(c.text)) for it, c in zip(items, done)]
    counts = {n: 0 for n in decoder.names}
    g: list[float] = []
    for c in done:
        for n, k in c.trace["tokens_by_expert"].items():
            counts[n] += k
        g.extend(t["g"] for t in c.trace["tokens"])
    total = sum(counts.values())
    mean, lo, hi = bootstrap_ci(scores)
    deferred = total - counts[decoder.names[0]]
    point = CurvePoint(None, threshold, round(mean, 4), round(lo, 4), round(hi, 4), round(deferred / total, 4) if total else 0.0, total, counts)
    return point, g


def choose(curve: Sequence[CurvePoint]) -> tuple[CurvePoint, CurvePoint]:
    """(best, cheapest): the highest accuracy (ties: the lower deferral rate, then the
    higher threshold); the lowest deferral rate whose accuracy is at least the best's
    95% interval's lower end (ties: the higher accuracy)."""
    best = max(curve, key=lambda p: (p.accuracy, -p.deferral_rate, p.threshold))
    cheapest = min((p for p in curve if p.accuracy >= best.ci_low), key=lambda p: (p.deferral_rate, -p.accuracy, -p.threshold))
    return best, cheapest


def tune_threshold(
    decoder: "CoLLMDecoder",
    data: "str | Sequence[ValidationItem]",
    *,
    limit: int | None = None,
    rates: Sequence[float] = DEFAULT_RATES,
    pick: str = "best",
    progress: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """Score ``decoder`` on ``data`` at the thresholds that give each deferral ``rates``
    on the base's own answers; return the curve and the best point. ``data`` is a
    name for ``validation_set`` or the items themselves. The decoder's threshold is
    left at the one ``pick`` chooses (see the module's docstring)."""
    if pick not in PICKS:
        raise CollabError(f"--pick: expected one of {', '.join(PICKS)}, found {pick!r}")
    if any(not 0 <= r <= 1 for r in rates):
        raise CollabError(f"--rates: expected shares from 0 to 1, found {list(rates)!r}")
    items = validation_set(data, limit) if isinstance(data, str) else list(data)[:limit]
    if not items:
        raise CollabError(f"{data}: no validation examples")
    never, g = _run(decoder, items, 1.0)
    never.target_rate = 0.0
    etas = thresholds_for_rates(g, rates)
    points: dict[float, CurvePoint] = {1.0: never}
    todo = [e for e in dict.fromkeys(etas) if e not in points]
    for i, eta in enumerate(todo):
        if progress is not None:
            progress(i, len(todo))
        points[eta], _ = _run(decoder, items, eta)
    if progress is not None:
        progress(len(todo), len(todo))
    curve = []
    for r, eta in zip(rates, etas):
        p = CurvePoint(**{**asdict(points[eta]), "target_rate": float(r)})
        curve.append(p)
    best, cheapest = choose(curve)
    gs = sorted(g)
    q = {f"p{int(p * 100)}": round(gs[min(len(gs) - 1, int(p * (len(gs) - 1)))], 4) for p in (0.1, 0.25, 0.5, 0.75, 0.9)} if gs else {}
    result = TuneResult(data=data if isinstance(data, str) else "custom", examples=len(items), points=curve, best=best, cheapest=cheapest, pick=pick, g_quantiles=q)
    decoder.threshold = result.chosen.threshold
    return result


def write_curve(result: TuneResult, out: str | Path, title: str = "Co-LLM: accuracy vs deferral rate") -> tuple[Path, Path]:
    """``curve.json`` and ``curve.png`` in the directory ``out`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from collab.io import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "curve.json", out / "curve.png"
    atomic_write_json(json_path, result.to_dict())
    pts = sorted(result.points, key=lambda p: p.deferral_rate)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [p.deferral_rate for p in pts]
    ax.fill_between(xs, [p.ci_low for p in pts], [p.ci_high for p in pts], alpha=0.2, label="95% interval")
    ax.plot(xs, [p.accuracy for p in pts], marker="o", label="co-decoder")
    for p in pts:
        ax.annotate(f"{p.threshold:.3g}", (p.deferral_rate, p.accuracy), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    c = result.chosen
    ax.scatter([c.deferral_rate], [c.accuracy], marker="*", s=160, color="red", zorder=3, label=f"chosen ({result.pick}): threshold {c.threshold:.3g}")
    ax.set_xlabel("deferral rate (share of tokens the assistants write)")
    ax.set_ylabel(f"accuracy on {result.data} (n={result.examples})")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = png_path.with_name(".curve.png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(png_path)
    return json_path, png_path


def tune_head(
    head_dir: str | Path,
    data: str,
    out: str | Path,
    *,
    base: str | None = None,
    assistants: Sequence[str] | None = None,
    limit: int | None = None,
    rates: Sequence[float] = DEFAULT_RATES,
    pick: str = "best",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TuneResult, Path, Path]:
    """``collab decode tune``: load the head's experts (the references it was trained
    with, unless ``base``/``assistants`` override them), tune, write the curve."""
    from collab.experts import Expert
    from decoding.artefact import read_config
    from decoding.system import CoLLMDecoder

    hc = read_config(head_dir)
    refs = list(assistants) if assistants else [a["ref"] for a in hc.assistants]
    if len(refs) != hc.n_assistants:
        raise CollabError(f"--assistant: the head was trained for {hc.n_assistants} assistant(s), {len(refs)} given")
    names = [a["name"] for a in hc.assistants]
    base_e = Expert.load(base or hc.base["ref"], name=hc.base["name"])
    decoder = CoLLMDecoder.load(head_dir, base_e, [Expert.load(r, name=n) for r, n in zip(refs, names)])
    result = tune_threshold(decoder, data, limit=limit, rates=rates, pick=pick, progress=progress)
    title = f"Co-LLM: {hc.base['name']} + {', '.join(names)}"
    json_path, png_path = write_curve(result, out, title)
    return result, json_path, png_path
