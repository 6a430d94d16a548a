"""``collab fuse cold``: parse arguments and call ``merging.cold.cold_fusion``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

fuse_app = typer.Typer(help="Build one model from several contributors' fine-tunes, fused over iterations.", no_args_is_help=True)


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


def register(app: typer.Typer) -> None:
    """Add ``collab fuse`` (``cold``) to the collab CLI."""
    app.add_typer(fuse_app, name="fuse")
