"""``collab fuse``: ColD Fusion (``cold``, ``merging.cold``) and FusionFactory's thought
level (``thought build``/``thought prompt``, ``routers.fusion``) and model level
(``distill``, ``merging.distill``). Each command parses its arguments and calls the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

fuse_app = typer.Typer(
    help="Fuse what several experts know: ColD Fusion of fine-tunes (cold), thought templates from a routing table's responses "
    "(thought), one model distilled from them (distill).",
    no_args_is_help=True,
)
thought_app = typer.Typer(help="FusionFactory's thought level: summarise the pool's best responses into templates, retrieve them at inference.", no_args_is_help=True)
fuse_app.add_typer(thought_app, name="thought")


@fuse_app.command("cold")
def cold_command(
    base: Annotated[str, typer.Option("--base", help="The starting model: zoo:NAME, a model directory, a .gguf file.")],
    contributors: Annotated[str, typer.Option("--contributors", help="Comma-separated skill:NAME or JSONL files (prompt/response lines).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: iter-TT/ per iteration and cold.json; rerun to resume.")],
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="Fuse iterations (a rerun with more continues the run).")] = 3,
    per_iter: Annotated[Optional[int], typer.Option("--per-iter", min=1, help="Contributors sampled per iteration (default: all).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=0, help="LoRA steps of each contributor per iteration.")] = 30,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the sampling, each LoRA's init and batch order.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warm-up, then cosine).")] = 2e-3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up steps of each fine-tune.")] = 3,
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank.")] = 8,
    keep_contributors: Annotated[bool, typer.Option("--keep-contributors", help="Keep every contributor's dense model in iter-TT/contributors/.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record (cold.json) as JSON.")] = False,
) -> None:
    """ColD Fusion (Don-Yehiya et al. 2023): each iteration, sampled contributors fine-tune the current model on their own data; their average is the next model."""
    import json
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from merging.cold import ColdFusionConfig, cold_fusion

    names = [c.strip() for c in contributors.split(",") if c.strip()]
    cfg = ColdFusionConfig(
        base=base, contributors=names, iterations=iterations, per_iter=per_iter, steps=steps, seed=seed,
        batch_size=batch_size, learning_rate=lr, warmup_steps=warmup, rank=rank, alpha=2 * rank,
    )
    result = cold_fusion(cfg, out, quiet=quiet or as_json, keep_contributors=keep_contributors)
    if as_json:
        typer.echo(json.dumps(result.record, indent=2))
        return
    resumed = len(result.models) - len(result.ran)
    for it in result.record["iterations"]:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in it["final_loss"].items() if v is not None)
        typer.echo(f"iter-{it['iteration']:02d}: {', '.join(it['contributors'])} ({losses or 'no steps'}; {it['seconds']} s)")
    typer.echo(f"wrote {result.final} ({len(result.ran)} iterations run, {resumed} resumed; record {out / 'cold.json'})")


def _open(ref: str, spec: Optional[Path]) -> object:
    if spec is not None:
        from collab.spec import load_spec

        return load_spec(spec).system(ref)
    from collab.spec import open_system

    return open_system(ref)


@thought_app.command("build")
def thought_build_command(
    table: Annotated[Path, typer.Option("--table", help="A routing table with responses (collab eval ... --routing-table OUT --responses), a RouteLLM .csv, or routellm-gsm8k (shipped).")],
    summariser: Annotated[str, typer.Option("--summariser", help="The model that writes the templates: zoo:NAME, a directory, a .gguf, or a system of --spec.")],
    out: Annotated[Path, typer.Option("--out", help="The thought bank directory to write.")],
    spec: Annotated[Optional[Path], typer.Option("--spec", help="A spec file whose system --summariser names.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Responses summarised per query.")] = 3,
    pre: Annotated[int, typer.Option("--pre", min=1, help="With a judge field: the first PRE by score are re-sorted by the judge.")] = 5,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Template length limit (tokens).")] = 96,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1, help="Only the table's first N rows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Queries per call to the summariser.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bank once the new one is complete.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Summarise each query's top responses (score, then cost; then a judge) into a thought template; an interrupted build resumes."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from collab.progress import phase_bars
    from routers.fusion import build_thought_bank

    model = _open(summariser, spec)
    with phase_bars(quiet, {"summarise": "summarising"}) as report:
        bank = build_thought_bank(
            table, model, out, summariser_ref=summariser, top=top, pre=pre, max_tokens=max_tokens, limit=limit,
            batch_size=batch_size, overwrite=overwrite, progress=None if report is None else (lambda done, total: report("summarise", done, total, None)),
        )
    cfg = bank.config
    typer.echo(f"wrote {out}: {cfg['entries']} templates ({', '.join(f'{t}: {n}' for t, n in cfg['tasks'].items())}); {cfg['empty_templates']} empty")


@thought_app.command("prompt")
def thought_prompt_command(
    bank: Annotated[Path, typer.Option("--bank", help="A thought bank (collab fuse thought build).")],
    question: Annotated[str, typer.Argument(help="The question to retrieve for.")],
    k: Annotated[int, typer.Option("--k", min=0, help="Entries retrieved.")] = 3,
    mode: Annotated[str, typer.Option("--mode", help="thought (templates) or fewshot (questions with gold answers).")] = "thought",
    task: Annotated[Optional[str], typer.Option("--task", help="Retrieve within this task (default: the nearest task's entries).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the retrieved entries and the prompt as JSON.")] = False,
) -> None:
    """Show what `type: thought` would send the target for QUESTION: the retrieved entries and the prompt."""
    import json

    from collab.io import silence_library_progress
    from routers.fusion import MODES, FusionError, ThoughtBank, thought_prompt

    silence_library_progress()  # the encoder's loading bar would precede a short answer
    if mode not in MODES:
        raise FusionError(f"--mode: expected one of {', '.join(MODES)}, found {mode!r}")
    b = ThoughtBank.load(bank)
    hits, searched = b.retrieve(question, k, task)
    text = thought_prompt(question, [e for e, _ in hits], mode)
    if as_json:
        typer.echo(json.dumps({"task": searched, "retrieved": [{"id": e.id, "similarity": round(s, 4), "prompt": e.prompt} for e, s in hits], "prompt": text}, indent=2))
        return
    typer.echo(f"task: {searched}")
    for e, s in hits:
        typer.echo(f"  {s:.3f}  {e.id}: {e.prompt}")
    typer.echo("\n" + text)


@fuse_app.command("distill")
def distill_command(
    table: Annotated[Path, typer.Option("--table", help="A routing table with responses and gold answers (collab eval ... --responses), or routellm-gsm8k (shipped).")],
    out: Annotated[Path, typer.Option("--out", help="The LoRA adapter directory to write (Expert.load takes it).")],
    target: Annotated[str, typer.Option("--target", help="The model to fine-tune: zoo:NAME, a directory, a .gguf.")] = "zoo:smollm2-135m-instruct",
    k: Annotated[int, typer.Option("--k", min=0, help="Correct pool responses per query, beside the gold answer.")] = 5,
    setting: Annotated[str, typer.Option("--setting", help="perf (score, then length), judge (judge, then length) or gold (gold answers only, same size: the baseline).")] = "perf",
    steps: Annotated[int, typer.Option("--steps", min=1, help="LoRA optimizer steps.")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warm-up, then cosine).")] = 2e-3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up steps.")] = 5,
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank (alpha = 2 x rank).")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the LoRA's initialisation and the batch order.")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1, help="Only the table's first N rows.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing distilled model once the new one is complete.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """FusionFactory's model level: LoRA-train TARGET on each query's gold answer plus up to K correct pool responses; resumes when interrupted."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from collab.progress import phase_bars
    from merging.distill import DistillConfig, distill

    cfg = DistillConfig(target=target, k=k, setting=setting, steps=steps, batch_size=batch_size, learning_rate=lr, warmup_steps=warmup, rank=rank, alpha=2 * rank, seed=seed)
    with phase_bars(quiet, {"train": "training"}) as report:
        record = distill(table, cfg, out, limit=limit, overwrite=overwrite, progress=None if report is None else (lambda step, total, loss: report("train", step, total, loss)))
    sources = ", ".join(f"{s}: {n}" for s, n in record["by_source"].items())
    typer.echo(f"wrote {out}: {record['examples']} examples ({sources}); final loss {record['final_loss']:.3f}; {record['seconds']} s")


def register(app: typer.Typer) -> None:
    """Add ``collab fuse`` (``cold``, ``thought``, ``distill``) to the collab CLI."""
    app.add_typer(fuse_app, name="fuse")
