"""``collab merge``: parse arguments and call ``merging.merge`` (``collab fuse`` lives in ``merging.fuse_cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def merge_command(
    config: Annotated[Path, typer.Argument(help="A mergekit YAML config (plus collab's methods and 'search:' block).")],
    out_dir: Annotated[Optional[Path], typer.Argument(help="Where to write the merged Hugging Face model directory.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the config and the inputs' shapes; write nothing.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin pickle weights (they can run code).")] = False,
    search: Annotated[Optional[str], typer.Option("--search", help="Tune per-model weights first: grid, greedy or cmaes.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for randomised methods (dare_*, della) and the search.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT_DIR if it exists (only once the merge is complete).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="List every merge method and exit.")] = False,
) -> None:
    """Merge models from a mergekit YAML config into a new model directory."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if list_methods:
        from merging.registry import all_methods

        for m in all_methods().values():
            typer.echo(f"{m.name:18s} {m.source:9s} base={m.base:9s} {m.reference_url}")
        return
    if out_dir is None and not dry_run:
        raise typer.BadParameter("OUT_DIR is required unless --dry-run is given")
    from merging.runner import merge

    result = merge(config, out_dir, allow_pickle=allow_pickle, dry_run=dry_run, search=search, overwrite=overwrite, seed=seed, quiet=quiet)
    if dry_run:
        typer.echo(f"ok: '{result.method}' merge of {len(result.inputs)} models is valid ({', '.join(result.inputs)}); nothing written")
    else:
        typer.echo(f"wrote {result.out_dir} ({result.method}, {result.tensors} tensors, {result.seconds:.1f} s)")


def register(app: typer.Typer) -> None:
    """Add ``collab merge`` and ``collab fuse`` to the collab CLI."""
    from merging import fuse_cli

    app.command("merge")(merge_command)
    fuse_cli.register(app)
