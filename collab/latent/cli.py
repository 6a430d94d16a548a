"""``collab latent train``: parse the options, call ``collab.latent.train.train_latent``.

collab's core imports no CLI library (tests/test_imports.py), and this module is
part of the core: it builds its sub-command group with the class of the app it
is given, and typer reads the options from the function's signature (each
``name: type = default`` becomes ``--name``). Nothing heavy is imported until
the command runs.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

from collab.latent.train import LatentTrainConfig

_D = LatentTrainConfig()


@contextlib.contextmanager
def _bars(quiet: bool) -> Iterator[Any]:
    """A progress callback drawing one rich bar per phase (None when quiet)."""
    if quiet:
        from collab.io import silence_library_progress

        silence_library_progress()
        yield None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    labels = {"scoring": "scoring the data (each expert alone)", "training": "joint training (router + interaction layers)"}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int, loss: float | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(labels.get(phase, phase), total=total, loss="")
            bar.update(tasks[phase], completed=done, loss="" if loss is None else f"loss {loss:.4f}")

        yield report


def train(
    experts: str = "",
    data: str = "",
    out: str = "",
    top_k: int = _D.top_k,
    stacks: int = _D.stacks,
    steps: int = _D.steps,
    batch_size: int = _D.batch_size,
    latent_dim: int = _D.latent_dim,
    heads: int = _D.heads,
    encoder: str = _D.encoder,
    lr: float = _D.lr,
    gate_lr: float = _D.gate_lr,
    router_lr: float = _D.router_lr,
    router_weight: float = _D.router_weight,
    balance_weight: float = _D.balance_weight,
    examples: int = _D.examples or 400,
    max_prompt_tokens: int = _D.max_prompt_tokens,
    max_answer_tokens: int = _D.max_answer_tokens,
    seed: int = _D.seed,
    checkpoint_every: int = _D.checkpoint_every,
    overwrite: bool = False,
    quiet: bool = False,
) -> None:
    """Train a Mixture of Thoughts: a router and interaction layers over frozen experts.

    --experts: REF,REF[,...] zoo:NAME, directories or .gguf files (two or more)
    --data: FILE.jsonl ({prompt, response} or {messages}) or skill:NAME
    --out: the checkpoint directory (config.json + weights.safetensors)
    --top-k: active experts per query; --stacks: interaction layers per expert
    --steps: joint-training steps of --batch-size conversations
    --latent-dim, --heads: the shared latent space and its cross-attention
    --encoder: the router's frozen query encoder, minilm (zoo:minilm-l6) or ngram
    --lr: interaction layers; --gate-lr: their gates; --router-lr: router
    --router-weight, --balance-weight: the router and load-balancing losses
    --examples: conversations to read
    --max-prompt-tokens, --max-answer-tokens: longest kept, per expert

    An interrupted run resumes when rerun with the same arguments.
    --overwrite replaces a checkpoint once the new one is complete.
    """
    from collab.errors import CollabError
    from collab.latent.train import train_latent

    refs = [r.strip() for r in experts.split(",") if r.strip()]
    for key, value in (("--experts", refs), ("--data", data), ("--out", out)):
        if not value:
            raise CollabError(f"{key}: required (see collab latent train --help)")
    cfg = LatentTrainConfig(
        top_k=top_k, stacks=stacks, latent_dim=latent_dim, heads=heads, encoder=encoder, steps=steps, batch_size=batch_size, lr=lr, gate_lr=gate_lr,
        router_lr=router_lr, router_weight=router_weight, balance_weight=balance_weight, examples=examples,
        max_prompt_tokens=max_prompt_tokens, max_answer_tokens=max_answer_tokens, seed=seed, checkpoint_every=checkpoint_every,
    )
    with _bars(quiet) as report:
        path = train_latent(refs, data, out, cfg, overwrite=overwrite, progress=report)
    m = json.loads((path / "config.json").read_text())["metrics"]
    share = ", ".join(f"{k} {v:.0%}" for k, v in m["primary_share"].items())
    nll = ", ".join(f"{k} {v:.2f}" for k, v in m["nll_per_answer"].items())
    final = m["final_loss"] or {}
    print(
        f"trained a mixture of {len(refs)} experts -> {path} ({m['seconds']} s)\n"
        f"  trainable parameters: {m['trainable_parameters']:,} ({m['trainable_share']:.2%} of the experts')\n"
        f"  answer NLL alone: {nll}; primary share: {share}; router = best single expert on {m['router_oracle_agreement']:.0%}\n"
        f"  final loss {final.get('loss', float('nan')):.4f} (LM {final.get('lm', float('nan')):.4f}, router {final.get('router', float('nan')):.4f})"
    )


def register(app: Any) -> None:
    """Add ``collab latent train`` to the collab CLI (a typer app)."""
    latent_app = type(app)(help="Mixture of Thoughts: frozen experts that cross-attend to each other's hidden states.", no_args_is_help=True)
    latent_app.command("train")(train)
    app.add_typer(latent_app, name="latent")
