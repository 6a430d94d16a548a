"""``collab latent train``: parse the options, call ``collab.latent.train.train_latent``.

Imports only typer, the stdlib and collab's light modules at module level (the
training defaults come from ``LatentTrainConfig``, which imports no torch), so
``collab --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from collab.latent.train import LatentTrainConfig
from collab.progress import phase_bars

latent_app = typer.Typer(help="Mixture of Thoughts: frozen experts that cross-attend to each other's hidden states.", no_args_is_help=True)

_D = LatentTrainConfig()

#: The training phases' progress bar labels.
TRAIN_PHASES = {"scoring": "scoring the data (each expert alone)", "training": "joint training (router + interaction layers)"}


@latent_app.command("train")
def train(
    experts: Annotated[str, typer.Option("--experts", help="Two or more experts, comma-separated: REF,REF[,...] (zoo:NAME, model directories or .gguf files).")],
    data: Annotated[str, typer.Option("--data", help="Training data: a .jsonl of {prompt, response}, {messages} or {context, continuation}, or skill:arith|lists|units|mixed (the skills' training split).")],
    out: Annotated[Path, typer.Option("--out", help="The checkpoint directory to write (config.json + weights.safetensors).")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Active experts per query: the primary and K-1 peers (1: routing alone).")] = _D.top_k,
    stacks: Annotated[int, typer.Option("--stacks", min=1, help="Interaction layers per expert, at the end of this many equal stacks of its layers.")] = _D.stacks,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Joint-training steps (router + interaction layers).")] = _D.steps,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Training conversations per step.")] = _D.batch_size,
    latent_dim: Annotated[int, typer.Option("--latent-dim", min=1, help="Width of the shared latent space (divisible by --heads).")] = _D.latent_dim,
    heads: Annotated[int, typer.Option("--heads", min=1, help="Cross-attention heads in the latent space.")] = _D.heads,
    encoder: Annotated[str, typer.Option("--encoder", help="The router's frozen query encoder: 'minilm' (zoo:minilm-l6) or 'ngram' (hashed character 3-grams, no model).")] = _D.encoder,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Learning rate of the interaction layers (all but their gates).")] = _D.lr,
    gate_lr: Annotated[float, typer.Option("--gate-lr", min=0.0, help="Learning rate of the gates (they start at zero, so they get a larger rate).")] = _D.gate_lr,
    router_lr: Annotated[float, typer.Option("--router-lr", min=0.0, help="Learning rate of the router.")] = _D.router_lr,
    router_weight: Annotated[float, typer.Option("--router-weight", min=0.0, help="Weight of the router's loss (against each expert's NLL alone).")] = _D.router_weight,
    balance_weight: Annotated[float, typer.Option("--balance-weight", min=0.0, help="Weight of the load-balancing loss.")] = _D.balance_weight,
    examples: Annotated[int, typer.Option("--examples", min=1, help="Training conversations to read (the first N of a file; N drawn from a skill).")] = _D.examples or 400,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", min=1, help="Longest prompt kept (its last tokens), per expert.")] = _D.max_prompt_tokens,
    max_answer_tokens: Annotated[int, typer.Option("--max-answer-tokens", min=2, help="Longest answer kept (end of sequence included), per expert.")] = _D.max_answer_tokens,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the initialisation, the batches and dropout.")] = _D.seed,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Save a checkpoint every N steps.")] = _D.checkpoint_every,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it is a trained mixture (only once the new one is complete).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a Mixture of Thoughts: a router and interaction layers over frozen experts;
    an interrupted run resumes when rerun with the same arguments."""
    from collab.latent.train import train_latent

    refs = [r.strip() for r in experts.split(",") if r.strip()]
    cfg = LatentTrainConfig(
        top_k=top_k, stacks=stacks, latent_dim=latent_dim, heads=heads, encoder=encoder, steps=steps, batch_size=batch_size, lr=lr, gate_lr=gate_lr,
        router_lr=router_lr, router_weight=router_weight, balance_weight=balance_weight, examples=examples,
        max_prompt_tokens=max_prompt_tokens, max_answer_tokens=max_answer_tokens, seed=seed, checkpoint_every=checkpoint_every,
    )
    with phase_bars(quiet, TRAIN_PHASES) as report:
        path = train_latent(refs, data, out, cfg, overwrite=overwrite, progress=report)
    m = json.loads((path / "config.json").read_text())["metrics"]
    share = ", ".join(f"{k} {v:.0%}" for k, v in m["primary_share"].items())
    nll = ", ".join(f"{k} {v:.2f}" for k, v in m["nll_per_answer"].items())
    final = m["final_loss"] or {}
    typer.echo(
        f"trained a mixture of {len(refs)} experts -> {path} ({m['seconds']} s)\n"
        f"  trainable parameters: {m['trainable_parameters']:,} ({m['trainable_share']:.2%} of the experts')\n"
        f"  answer NLL alone: {nll}; primary share: {share}; router = best single expert on {m['router_oracle_agreement']:.0%}\n"
        f"  final loss {final.get('loss', float('nan')):.4f} (LM {final.get('lm', float('nan')):.4f}, router {final.get('router', float('nan')):.4f})"
    )


def register(app: typer.Typer) -> None:
    """Add ``collab latent`` to the collab CLI."""
    app.add_typer(latent_app, name="latent")
