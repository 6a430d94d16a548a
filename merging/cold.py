"""ColD Fusion: collaborative descent by fine-tuning, averaging and repeating.

Don-Yehiya et al., "ColD Fusion: Collaborative Descent for Distributed
Multitask Finetuning", ACL 2023 (https://arxiv.org/abs/2212.01378). Starting
from a pretrained base, every iteration samples K contributors; each fine-tunes
the current base on its own data only (here: a fresh LoRA adapter, trained
with the zoo's trainer ``collab.zoo_build.train_lora`` and merged into dense
weights); the "repository" then averages the contributors' models element-wise
into the next base, with collab's own ``linear`` merge (``merging.merge``).

``cold_fusion(config, out_dir)`` is the library entry point; ``collab fuse cold``
calls it. Each iteration ``t`` is written atomically to ``out_dir/iter-TT/``:
a Hugging Face model directory (the fused model) with ``cold_metrics.json``
(contributors, losses, the ids of the examples each saw and their hash). The
run's record ``out_dir/cold.json`` holds the config and every iteration's
summary. A rerun with the same config continues after the last complete
iteration (``iterations`` may grow); any other difference is an error.

The average is computed in float64 and written in float32, so that the mean of
K identical models is that model bit for bit (a float32 sum of three copies
divided by three is not) and one model's "average" is the model itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collab import skills
from collab.io import jsonl_rows
from collab.zoo_build import DEFAULT_TARGETS, DomainExpertConfig
from merging.errors import MergeError

REFERENCE_URL = "https://arxiv.org/abs/2212.01378"
#: Version of the ``cold.json`` record layout.
RECORD_VERSION = 1
RECORD = "cold.json"
METRICS = "cold_metrics.json"
_ITER_RE = re.compile(r"^iter-(\d+)$")


class ColdFusionError(MergeError):
    """A ColD Fusion run that cannot go on as asked: a bad contributor, or an
    output directory holding a different run (the message names the field and
    the stored versus given value)."""


@dataclass
class ColdFusionConfig:
    """What a ColD Fusion run does; recorded in ``cold.json`` and compared on resume."""

    base: str
    """The starting model: zoo:NAME, a Hugging Face directory, a .gguf file or a LoRA adapter directory."""
    contributors: list[str]
    """``skill:NAME`` (the zoo's seeded training data for that skill) or a JSONL file of prompt/response lines."""
    iterations: int = 3
    """Fuse iterations to run (a rerun with a larger value continues the run)."""
    per_iter: int | None = None
    """Contributors sampled per iteration (seeded); None takes all of them every iteration."""
    steps: int = 30
    """Optimizer steps of each contributor's fresh LoRA per iteration."""
    seed: int = 0
    """Seeds the sampling of contributors, each LoRA's initialisation and each contributor's batch order."""
    batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 3
    rank: int = 8
    alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_examples: int = 4000
    """Examples generated per ``skill:`` contributor (the zoo's training set size)."""
    data_seed: int = skills.TRAIN_SEED
    """Seed of the ``skill:`` contributors' data (the zoo experts' training data by default)."""

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ColdFusionError(f"{name}: expected an integer >= {minimum}, found {value!r}")

        positive("iterations", self.iterations)
        positive("steps", self.steps, 0)
        positive("batch_size", self.batch_size)
        positive("rank", self.rank)
        positive("train_examples", self.train_examples)
        if not self.contributors:
            raise ColdFusionError("contributors: expected at least one (skill:NAME or a .jsonl file), found none")
        if self.per_iter is not None:
            positive("per_iter", self.per_iter)
            if self.per_iter > len(self.contributors):
                raise ColdFusionError(f"per_iter: expected at most {len(self.contributors)} (the number of contributors), found {self.per_iter}")
        if not self.learning_rate > 0:
            raise ColdFusionError(f"learning_rate: expected a positive number, found {self.learning_rate!r}")

    @property
    def k(self) -> int:
        """Contributors per iteration."""
        return self.per_iter if self.per_iter is not None else len(self.contributors)


@dataclass
class Contributor:
    """One contributor: its name, where its data comes from, and the data."""

    name: str
    source: str
    examples: list[skills.Example]
    data_sha256: str


@dataclass
class ColdFusionResult:
    """What a run left: the output directory, the fused model of each complete
    iteration, and which iterations this call ran (the others were resumed)."""

    out_dir: Path
    models: list[Path]
    ran: list[int]
    record: dict[str, Any]

    @property
    def final(self) -> Path:
        """The last iteration's fused model."""
        return self.models[-1]


# ------------------------------------------------------------------ contributors
def load_contributor(spec: str, config: ColdFusionConfig) -> Contributor:
    """``skill:NAME`` (``config.train_examples`` examples from ``config.data_seed``)
    or a JSONL file whose lines hold ``prompt`` and ``response`` (or
    ``question`` and ``answer``), and optionally ``id``."""
    from collab.io import sha256_text

    if spec.startswith("skill:"):
        name = spec.removeprefix("skill:")
        if name not in skills.SKILLS:
            raise ColdFusionError(f"contributors: unknown skill {spec!r}; expected one of {', '.join('skill:' + s for s in skills.SKILLS)} or a .jsonl file")
        examples = skills.generate(name, config.train_examples, config.data_seed)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ColdFusionError(f"contributors: {spec!r} is neither skill:NAME ({', '.join(skills.SKILLS)}) nor an existing JSONL file")
        name = path.stem
        examples = _read_jsonl(path, name)
    data = sha256_text("\n".join(f"{e.id}\t{e.question}\t{e.answer}" for e in examples))
    return Contributor(name=name, source=spec, examples=examples, data_sha256=data)


def _read_jsonl(path: Path, name: str) -> list[skills.Example]:
    out: list[skills.Example] = []
    for n, row in jsonl_rows(path, ColdFusionError):
        if not isinstance(row, dict):
            raise ColdFusionError(f"{path}:{n}: expected an object with 'prompt' and 'response', found {type(row).__name__}")
        prompt = row.get("prompt", row.get("question"))
        response = row.get("response", row.get("answer"))
        for key, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str) or not value.strip():
                raise ColdFusionError(f"{path}:{n}: field '{key}': expected a non-empty string, found {value!r}")
        out.append(skills.Example(id=str(row.get("id", f"{name}-{n}")), skill=name, question=prompt, answer=response))
    if not out:
        raise ColdFusionError(f"{path}: no examples (expected JSON lines with 'prompt' and 'response')")
    return out


def load_contributors(config: ColdFusionConfig) -> list[Contributor]:
    """Every contributor of ``config``, with unique names."""
    found = [load_contributor(c, config) for c in config.contributors]
    names = [c.name for c in found]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ColdFusionError(f"contributors: the name {dup!r} occurs twice ({', '.join(c.source for c in found if c.name == dup)})")
    for c in found:
        if len(c.examples) < config.batch_size:
            raise ColdFusionError(f"contributors: {c.source} has {len(c.examples)} examples, fewer than batch_size={config.batch_size}")
    return found


# ------------------------------------------------------------ seeded choices
def sample_contributors(names: list[str], k: int, seed: int, iteration: int) -> list[str]:
    """The ``k`` contributors of ``iteration`` (1-based), drawn with ``seed`` and
    returned in ``names`` order; independent of how many iterations run."""
    if k >= len(names):
        return list(names)
    chosen = set(random.Random(f"cold:{seed}:{iteration}").sample(names, k))
    return [n for n in names if n in chosen]


def contributor_seed(seed: int, iteration: int, name: str) -> int:
    """The training seed (LoRA initialisation and batch order) of ``name`` in ``iteration``."""
    return int(hashlib.sha256(f"cold:{seed}:{iteration}:{name}".encode()).hexdigest()[:8], 16)


def trainer_config(config: ColdFusionConfig, contributor: Contributor, iteration: int) -> DomainExpertConfig:
    """The zoo trainer's config for one contributor's fine-tune in ``iteration``."""
    return DomainExpertConfig(
        skill=contributor.name,
        base=config.base,
        rank=config.rank,
        alpha=config.alpha,
        target_modules=list(config.target_modules),
        learning_rate=config.learning_rate,
        steps=config.steps,
        batch_size=config.batch_size,
        train_examples=len(contributor.examples),
        warmup_steps=config.warmup_steps,
        seed=contributor_seed(config.seed, iteration, contributor.name),
        data_seed=config.data_seed,
        checkpoint_every=max(1, config.steps),
        save_dtype="float32",
    )


def seen_ids(contributor: Contributor, tcfg: DomainExpertConfig) -> list[str]:
    """Ids of the examples the contributor's fine-tune trains on, step by step."""
    from collab.zoo_build import batch_indices

    n = len(contributor.examples)
    return [contributor.examples[i].id for step in range(tcfg.steps) for i in batch_indices(n, tcfg.batch_size, tcfg.seed, step)]


# ---------------------------------------------------------------- averaging
def linear_config(model_dirs: list[Path]) -> dict[str, Any]:
    """The ``collab merge`` config of ColD Fusion's average: ``linear``, weight 1
    each, computed in float64 and written in float32."""
    return {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in model_dirs],
        "dtype": "float64",
        "out_dtype": "float32",
    }


def average_models(model_dirs: list[Path], out_dir: Path) -> Path:
    """The element-wise mean of ``model_dirs`` into ``out_dir``, through collab's
    ``linear`` merge (tokenizer and config from the first model)."""
    from merging.runner import merge

    merge(linear_config(model_dirs), out_dir, quiet=True, overwrite=True)
    return out_dir


# ------------------------------------------------------------------ the run
def _config_record(config: ColdFusionConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _check_resume(stored: dict[str, Any], config: ColdFusionConfig, contributors: list[Contributor], out: Path) -> None:
    record_cfg = stored.get("config", {})
    given = _config_record(config)
    for key in given:
        if key == "iterations":
            continue
        if key not in record_cfg or record_cfg[key] != given[key]:
            raise ColdFusionError(
                f"{out / RECORD}: '{key}' differs from this run's: stored {record_cfg.get(key)!r}, given {given[key]!r}; "
                "rerun with the stored arguments to continue, or choose another --out"
            )
    for c in contributors:
        want = stored.get("contributors", {}).get(c.name, {}).get("data_sha256")
        if want != c.data_sha256:
            raise ColdFusionError(f"{out / RECORD}: contributor '{c.name}' ({c.source}): its data changed since the run began (sha256 {want} stored, {c.data_sha256} now)")


def complete_iterations(out_dir: Path) -> list[int]:
    """The complete iterations under ``out_dir`` (1, 2, ..., n: consecutive)."""
    found = sorted(int(m.group(1)) for p in out_dir.glob("iter-*") if (m := _ITER_RE.match(p.name)) and (p / METRICS).exists())
    for i, t in enumerate(found, 1):
        if t != i:
            raise ColdFusionError(f"{out_dir}: iteration directories are not consecutive (found {', '.join(f'iter-{x:02d}' for x in found)})")
    return found


def iteration_dir(out_dir: Path, t: int) -> Path:
    """Where iteration ``t``'s fused model lies."""
    return out_dir / f"iter-{t:02d}"


def _weights_sha256(model_dir: Path) -> str:
    from collab.io import sha256_file

    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def cold_fusion(
    config: ColdFusionConfig,
    out_dir: str | Path,
    *,
    quiet: bool = False,
    keep_contributors: bool = False,
    on_iteration: Callable[[int, Path], None] | None = None,
) -> ColdFusionResult:
    """Run (or continue) ColD Fusion into ``out_dir``; see the module docstring.

    ``keep_contributors`` keeps each contributor's dense fine-tune in
    ``iter-TT/contributors/NAME/`` (a full model each). ``on_iteration(t, model_dir)``
    is called after each iteration this call completes."""
    from collab.io import atomic_directory, atomic_write_json, silence_library_progress

    out = Path(out_dir)
    contributors = load_contributors(config)
    by_name = {c.name: c for c in contributors}
    record_path = out / RECORD
    if out.exists() and any(out.iterdir()):
        if not record_path.exists():
            raise ColdFusionError(f"{out}: exists and is not a ColD Fusion run ({RECORD} not found); choose another --out")
        stored = json.loads(record_path.read_text())
        if stored.get("version") != RECORD_VERSION:
            raise ColdFusionError(f"{record_path}: version: expected {RECORD_VERSION}, found {stored.get('version')!r}")
        _check_resume(stored, config, contributors, out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob(".iter-*.partial")) + [out / ".work"]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run; never a complete iteration
    done = complete_iterations(out)
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "method": "cold_fusion",
        "reference_url": REFERENCE_URL,
        "config": _config_record(config),
        "contributors": {c.name: {"source": c.source, "examples": len(c.examples), "data_sha256": c.data_sha256} for c in contributors},
        "iterations": [json.loads((iteration_dir(out, t) / METRICS).read_text())["summary"] for t in done],
    }
    atomic_write_json(record_path, record)
    silence_library_progress()  # transformers' "Writing model shards" bars, between ours
    ran: list[int] = []
    work = out / ".work"
    try:
        with _progress(quiet) as bar:
            todo = list(range(len(done) + 1, config.iterations + 1))
            overall = bar.task(f"ColD Fusion ({config.k} of {len(contributors)} contributors x {config.steps} steps)", config.iterations, len(done))
            for t in todo:
                base_dir = _base_dir(config, out, t, work)
                names = sample_contributors([c.name for c in contributors], config.k, config.seed, t)
                t0 = time.perf_counter()
                rows, dirs = [], []
                for name in names:
                    row, path = _train_contributor(config, by_name[name], t, base_dir, work / f"iter-{t:02d}" / name, bar)
                    rows.append(row)
                    dirs.append(path)
                merged = work / f"iter-{t:02d}-fused"
                average_models(dirs, merged)
                target = iteration_dir(out, t)
                with atomic_directory(target) as tmp:
                    for f in merged.iterdir():
                        shutil.move(str(f), tmp / f.name)
                    if keep_contributors:
                        (tmp / "contributors").mkdir()
                        for name, path in zip(names, dirs):
                            shutil.move(str(path), tmp / "contributors" / name)
                    summary = {
                        "iteration": t,
                        "base": config.base if t == 1 else f"iter-{t - 1:02d}",
                        "contributors": names,
                        "final_loss": {r["name"]: r["final_loss"] for r in rows},
                        "seen_ids_sha256": {r["name"]: r["seen_ids_sha256"] for r in rows},
                        "weights_sha256": _weights_sha256(tmp),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                    merge_cfg = linear_config([Path("contributors") / n for n in names])
                    metrics = {"summary": summary, "merge": merge_cfg, "contributors": rows}
                    atomic_write_json(tmp / METRICS, metrics)
                    _write_card(tmp, config, summary, merge_cfg, keep_contributors)
                shutil.rmtree(work, ignore_errors=True)
                record["iterations"].append(summary)
                atomic_write_json(record_path, record)
                ran.append(t)
                bar.advance(overall)
                if on_iteration is not None:
                    on_iteration(t, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    models = [iteration_dir(out, t) for t in range(1, max(config.iterations, len(done)) + 1) if (iteration_dir(out, t) / METRICS).exists()]
    return ColdFusionResult(out_dir=out, models=models, ran=ran, record=record)


def _write_card(model_dir: Path, config: ColdFusionConfig, summary: dict[str, Any], merge_cfg: dict[str, Any], kept: bool) -> None:
    """Replace the merge's model card and config (which name the work directory)
    with the iteration's own, its merge config relative to ``contributors/``."""
    import yaml

    from collab.io import atomic_write_text

    t = summary["iteration"]
    kept_note = "kept in `contributors/`" if kept else "not kept (run with `--keep-contributors` to keep them)"
    card = (
        f"---\nlibrary_name: transformers\ntags:\n- merge\n- collab\n- cold-fusion\n---\n"
        f"# iter-{t:02d}: ColD Fusion iteration {t}\n\n"
        f"[ColD Fusion]({REFERENCE_URL}) of `{config.base}`: iteration {t} started from `{summary['base']}`; "
        f"{len(summary['contributors'])} contributors ({', '.join(summary['contributors'])}) each fine-tuned a fresh LoRA "
        f"(rank {config.rank}, {config.steps} steps, batch {config.batch_size}, lr {config.learning_rate}) on its own data only, "
        f"merged it into dense weights, and their models were averaged with `collab merge` (`linear`, weight 1 each, float64, "
        f"written in float32; `merge_config.yaml`, its inputs {kept_note}).\n\n"
        f"Losses, the ids of the examples each contributor saw and their hashes: `{METRICS}`; the whole run: `../{RECORD}`.\n"
    )
    atomic_write_text(model_dir / "README.md", card)
    atomic_write_text(model_dir / "merge_config.yaml", yaml.safe_dump(merge_cfg, sort_keys=False))


def _base_dir(config: ColdFusionConfig, out: Path, t: int, work: Path) -> Path:
    """The model iteration ``t`` starts from: the resolved ``config.base`` for the
    first, the previous iteration's fused model after it."""
    if t > 1:
        return iteration_dir(out, t - 1)
    from merging.inputs import InputResolver

    resolver = InputResolver(work / "base", search_dirs=[Path.cwd()])
    (work / "base").mkdir(parents=True, exist_ok=True)
    return resolver(config.base, "--base").path


def _train_contributor(config: ColdFusionConfig, c: Contributor, t: int, base_dir: Path, dest: Path, bar: _Bar) -> tuple[dict[str, Any], Path]:
    """Fine-tune a fresh LoRA of ``c`` on ``base_dir`` and write the dense model to ``dest``."""
    from collab.io import sha256_text
    from collab.zoo_build import save_merged, train_lora

    tcfg = trainer_config(config, c, t)
    t0 = time.perf_counter()
    task = bar.task(f"  iter {t:02d} · {c.name}", tcfg.steps, 0, loss="-")
    run = train_lora(tcfg, c.examples, base=base_dir, progress=lambda step, total, loss: bar.update(task, step, loss=f"{loss:.3f}"))
    save_merged(run, dest, side_files_from=base_dir)
    bar.remove(task)
    losses = list(run.losses)
    del run
    ids = seen_ids(c, tcfg)
    row = {
        "name": c.name,
        "source": c.source,
        "train_seed": tcfg.seed,
        "steps": tcfg.steps,
        "losses": losses,
        "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 5) if losses else None,
        "examples_seen": len(ids),
        "distinct_examples_seen": len(set(ids)),
        "seen_ids_sha256": sha256_text("\n".join(ids)),
        "seen_ids": ids,
        "data_sha256": c.data_sha256,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return row, dest


# ---------------------------------------------------------------- progress
class _Bar:
    """Rich progress bars on stderr, or nothing when quiet."""

    def __init__(self, progress: Any | None) -> None:
        self.progress = progress

    def task(self, description: str, total: int, completed: int, **fields: Any) -> Any:
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, completed=completed, loss=fields.get("loss", ""))

    def update(self, task: Any, completed: int, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(task, completed=completed, **fields)

    def advance(self, task: Any) -> None:
        if self.progress is not None:
            self.progress.advance(task)

    def remove(self, task: Any) -> None:
        if self.progress is not None:
            self.progress.remove_task(task)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[_Bar]:
    if quiet:
        yield _Bar(None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
    ) as progress:
        yield _Bar(progress)


def iter_records(out_dir: Path) -> Iterator[dict[str, Any]]:
    """Each complete iteration's ``cold_metrics.json``, in order."""
    for t in complete_iterations(Path(out_dir)):
        yield json.loads((iteration_dir(Path(out_dir), t) / METRICS).read_text())
