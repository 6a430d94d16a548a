"""``collab ccoe train|pop|push``: parse the options, call ``collab.ccoe``'s library functions.

Imports only typer, the stdlib and collab's light modules at module level (the
training defaults come from ``CCoETrainConfig``, which imports no torch), so
``collab --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from collab.ccoe.train import CCoETrainConfig
from collab.errors import CollabError
from collab.progress import phase_bars

ccoe_app = typer.Typer(
    help="CCoE: experts as their own top layers on one shared, frozen backbone.",
    no_args_is_help=True,
)

_D = CCoETrainConfig()


@ccoe_app.command("train")
def train(
    base: Annotated[
        str,
        typer.Option(
            "--base",
            help="The shared, frozen base: zoo:NAME, a model directory or a .gguf file.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The expert directory to write (config.json + branch.safetensors).",
        ),
    ],
    skill: Annotated[
        str | None,
        typer.Option(
            "--skill",
            help="Train on a zoo skill's training split: arith, lists, units or mixed.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Or train on a .jsonl of {prompt, response} or {messages} conversations (or skill:NAME).",
        ),
    ] = None,
    layers: Annotated[
        int,
        typer.Option(
            "--layers",
            min=1,
            help="L: the expert's own layers, the base's top L (trained fully; the rest stays frozen and shared).",
        ),
    ] = _D.layers,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="The expert's name (default: the skill, or the data file's stem).",
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=0, help="Optimizer steps.")
    ] = _D.steps,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Conversations per step.")
    ] = _D.batch_size,
    lr: Annotated[
        float,
        typer.Option(
            "--lr",
            min=0.0,
            help="Peak learning rate (AdamW; linear warm-up, cosine decay).",
        ),
    ] = _D.lr,
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", min=0, help="Steps of linear warm-up.")
    ] = _D.warmup_steps,
    examples: Annotated[
        int,
        typer.Option(
            "--examples",
            min=1,
            help="Training conversations to read (the first N of a file; N drawn from a skill).",
        ),
    ] = _D.examples or 1000,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens",
            min=2,
            help="Longest training sequence: the answer, and the prompt's last tokens before it.",
        ),
    ] = _D.max_tokens,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the batch order.")
    ] = _D.seed,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            "--checkpoint-every", min=1, help="Save a checkpoint every N steps."
        ),
    ] = _D.checkpoint_every,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace --out if it is a CCoE expert (only once the new one is complete).",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars.")
    ] = False,
) -> None:
    """Train one expert: the base's top --layers layers on one domain, everything else
    frozen; an interrupted run resumes when rerun with the same arguments."""
    from collab.ccoe.train import train_expert

    if (skill is None) == (data is None):
        raise CollabError("give exactly one of --skill NAME or --data FILE.jsonl")
    source = f"skill:{skill}" if skill is not None else str(data)
    cfg = CCoETrainConfig(
        layers=layers,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        examples=examples,
        max_tokens=max_tokens,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    with phase_bars(quiet, {"training": f"training the top {layers} layers"}) as report:
        path = train_expert(
            base, source, out, cfg, name=name, overwrite=overwrite, progress=report
        )
    c = json.loads((path / "config.json").read_text())
    m = c["metrics"]
    first, final = m.get("first_loss"), m.get("final_loss")
    losses = (
        f"loss {first:.4f} -> {final:.4f}"
        if first is not None and final is not None
        else "no steps"
    )
    typer.echo(
        f"trained expert '{c['name']}' (layers {c['depth']}..{c['num_hidden_layers'] - 1} of {c['base']}) -> {path} ({m['seconds']} s)\n"
        f"  trainable parameters: {m['trainable_parameters']:,} ({m['trainable_share']:.2%} of the base's); {losses}"
    )


@ccoe_app.command("pop")
def pop(
    expert: Annotated[
        Path,
        typer.Option(
            "--expert", help="A CCoE expert directory (collab ccoe train|push)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The standalone model directory to write (Hugging Face format).",
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="The base to put the expert on (default: the one it was trained on).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace --out if it is a model directory."),
    ] = False,
) -> None:
    """Take an expert out as a standalone model: the base with the expert's layers in place."""
    from collab.ccoe.standalone import pop_expert

    path = pop_expert(expert, out, base=base, overwrite=overwrite)
    info = json.loads((path / "collab_ccoe.json").read_text())
    typer.echo(
        f"popped expert '{info['name']}' (layers {info['depth']}.. on {info['base']}) -> {path}"
    )


@ccoe_app.command("push")
def push(
    base: Annotated[
        str,
        typer.Option(
            "--base",
            help="The shared base the expert must keep: zoo:NAME, a model directory or a .gguf file.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="A fine-tuned full model (e.g. a popped expert trained further).",
        ),
    ],
    layers: Annotated[
        int,
        typer.Option(
            "--layers",
            min=1,
            help="L: its top L layers become the expert; everything else must equal the base's exactly.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="The CCoE expert directory to write.")
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="The expert's name (default: the model directory's name)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it is a CCoE expert.")
    ] = False,
) -> None:
    """Put a fine-tuned model back as a CCoE expert; refused when its backbone differs from the base's."""
    from collab.ccoe.standalone import push_expert

    path = push_expert(base, model, layers, out, name=name, overwrite=overwrite)
    c = json.loads((path / "config.json").read_text())
    typer.echo(
        f"pushed expert '{c['name']}' (layers {c['depth']}..{c['num_hidden_layers'] - 1}; the backbone is {c['base']}'s) -> {path}"
    )


def register(app: typer.Typer) -> None:
    """Add ``collab ccoe`` to the collab CLI."""
    app.add_typer(ccoe_app, name="ccoe")
