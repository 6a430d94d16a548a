"""``merging.merge``: validate a merge config, run it on collab's engine
(``merging.engine``; mergekit's ``run_merge`` for the few configs the engine
does not lay out, see ``merging.mergekit_run``), and write the merged model
atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.config import MergePlan, plan_merge
from merging.errors import MergeError
from merging.inputs import InputResolver
from merging.tensorio import safetensors_files

#: Parameters per output shard (mergekit's ``--out-shard-size`` default is 5B).
DEFAULT_SHARD_SIZE = 5_000_000_000


@dataclass
class MergeResult:
    """What a merge did: where the model is, from what, and how long it took."""

    out_dir: Path | None
    method: str
    inputs: list[str]
    seconds: float
    dry_run: bool = False
    tensors: int = 0
    search_table: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)


def merge(
    config: str | os.PathLike[str] | dict[str, Any],
    out_dir: str | os.PathLike[str] | None,
    *,
    allow_pickle: bool = False,
    dry_run: bool = False,
    search: str | None = None,
    overwrite: bool = False,
    seed: int | None = None,
    quiet: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> MergeResult:
    """Merge the models a mergekit-style YAML config (path or dict) names into a
    Hugging Face directory ``out_dir``.

    Every check (methods, parameter names, base model, architectures, tensor
    shapes, vocabularies) runs before any tensor is written and raises
    MergeError. ``dry_run`` stops after the checks. ``search`` (grid, greedy or
    cmaes) tunes the per-model weights first (see ``merging.search``). The
    output appears only once complete: an interrupted merge leaves nothing.
    ``quiet`` draws no progress bars, and turns off transformers' and
    huggingface_hub's own for the rest of the process.
    """
    t0 = time.perf_counter()
    if out_dir is None and not dry_run:
        raise MergeError("out_dir: an output directory is required unless dry_run is set")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not overwrite and not dry_run:
        raise MergeError(f"{out}: already exists; choose another output directory or pass overwrite=True (--overwrite)")
    from collab.io import cache_root, silence_library_progress

    if quiet:
        silence_library_progress()  # transformers' own bars while LoRA inputs are merged and calibration models load
    work_root = cache_root() / "merge-work"
    work_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=work_root))
    try:
        def resolver(path: Path | None) -> InputResolver:
            dirs = [Path.cwd()] + ([path.parent.resolve()] if path is not None else [])
            return InputResolver(workdir, search_dirs=dirs, allow_pickle=allow_pickle, dry_run=dry_run)

        plan = plan_merge(config, resolver)
        if search is not None:
            plan.search = dict(plan.search or {}, method=search)
        if plan.search is not None:
            from merging.search import check_search

            check_search(plan)
        if dry_run:
            from merging.engine import check

            check(plan)
            return MergeResult(None, plan.method.name, plan.model_refs, time.perf_counter() - t0, dry_run=True)
        assert out is not None
        extra: dict[str, Any] = {}
        table = None
        with _progress(quiet) as progress:
            if plan.search is not None:
                from merging.search import run_search

                outcome = run_search(plan, workdir=workdir, quiet=quiet, seed=seed)
                table = outcome.table
                plan = outcome.plan
                extra["Coefficient search"] = outcome.markdown()
            from collab.io import atomic_directory

            with atomic_directory(out, overwrite=overwrite) as tmp:
                from merging.layout import unsupported

                if unsupported(plan) is None:
                    from merging.engine import run

                    n = run(plan, tmp, progress=progress, seed=seed, shard_size=shard_size, workdir=workdir)
                else:
                    from merging.mergekit_run import run as run_mergekit

                    n = run_mergekit(plan, tmp, seed=seed, progress=progress, workdir=workdir, shard_size=shard_size)
                if not safetensors_files(tmp):
                    raise MergeError(f"{plan.source_path or 'config'}: the merge produced no weights")
                _write_card(plan, tmp, out.name, extra, table)
        return MergeResult(out, plan.method.name, plan.model_refs, time.perf_counter() - t0, tensors=n, search_table=table)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class Progress:
    """A rich progress bar over tensors (a no-op when quiet)."""

    def __init__(self, bar: Any | None) -> None:
        self.bar = bar

    def start(self, description: str, total: int | None) -> Callable[[int], None]:
        if self.bar is None:
            return lambda n=1: None
        task = self.bar.add_task(description, total=total)
        return lambda n=1: self.bar.advance(task, n)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Progress]:
    if quiet:
        yield Progress(None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as RichProgress

    bar = RichProgress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=False
    )
    with bar:
        yield Progress(bar)


def _write_card(plan: MergePlan, out: Path, name: str, extra: dict[str, Any], table: list[dict[str, Any]] | None) -> None:
    import json

    from collab.io import atomic_write_text
    from merging.card import model_card

    atomic_write_text(out / "README.md", model_card(plan, name, extra))
    atomic_write_text(out / "merge_config.yaml", plan.source_text)
    if table is not None:
        atomic_write_text(out / "merge_search.json", json.dumps(table, indent=2) + "\n")
