"""``collab decode train|tune``. Imports only typer, the stdlib and collab's light
progress helper at module level."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from collab.progress import phase_bars

decode_app = typer.Typer(help="Co-LLM: a base model that learns when to let domain experts write the next token.", no_args_is_help=True)


#: The training phases' progress bar labels.
TRAIN_PHASES = {"scoring": "scoring the data (frozen models)", "init": "weak supervision (head)", "marginal": "marginal likelihood"}


def _refs(values: list[str]) -> list[str]:
    """``--assistant a,b --assistant c`` -> [a, b, c]."""
    return [r.strip() for v in values for r in v.split(",") if r.strip()]


@decode_app.command("train")
def train(
    base: Annotated[str, typer.Option("--base", help="The base expert: zoo:NAME, a model directory or a .gguf file.")],
    assistant: Annotated[list[str], typer.Option("--assistant", help="Assistant expert(s), same tokenizer as the base: REF[,REF...] (repeatable).")],
    data: Annotated[str, typer.Option("--data", help="Training data: a .jsonl of {prompt, response} or {messages}, or skill:arith|lists|units|mixed (the skills' training split).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the trained head to.")],
    steps: Annotated[int, typer.Option("--steps", min=0, help="Marginal-likelihood steps.")] = 200,
    init_steps: Annotated[int, typer.Option("--init-steps", min=0, help="Weak-supervision steps (the head alone).")] = 100,
    train_base: Annotated[str, typer.Option("--train-base", help="'none': train only the head; 'lora': also a LoRA on the base.")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Training conversations per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="The head's learning rate (marginal stage).")] = 1e-3,
    init_lr: Annotated[float, typer.Option("--init-lr", min=0.0, help="The head's learning rate (weak supervision).")] = 1e-3,
    lora_lr: Annotated[float, typer.Option("--lora-lr", min=0.0, help="The base LoRA's learning rate (--train-base lora).")] = 5e-4,
    pos_weight: Annotated[float, typer.Option("--pos-weight", min=0.0, help="Weight of the assistant labels in weak supervision.")] = 8.0,
    examples: Annotated[int, typer.Option("--examples", min=1, help="Training conversations to read (the first N of a file; N drawn from a skill).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the head's batches and the LoRA's initialisation.")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Save a checkpoint every N steps.")] = 50,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it is a deferral head (only once the new one is complete).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a Co-LLM deferral head; an interrupted run resumes when rerun with the same arguments."""
    from decoding.train import TrainConfig, train_colm

    cfg = TrainConfig(
        steps=steps, init_steps=init_steps, train_base=train_base, batch_size=batch_size, lr=lr, init_lr=init_lr, lora_lr=lora_lr,
        pos_weight=pos_weight, examples=examples, seed=seed, checkpoint_every=checkpoint_every,
    )
    with phase_bars(quiet, TRAIN_PHASES) as report:
        path = train_colm(base, _refs(assistant), data, out, cfg, overwrite=overwrite, progress=report)
    m = json.loads((path / "config.json").read_text())["metrics"]
    share = ", ".join(f"{k} {v:.1%}" for k, v in m["weak_label_share"].items())
    nll = ", ".join(f"{k} {v:.3f}" for k, v in m["nll_per_token"].items())
    typer.echo(
        f"trained a deferral head on {m['answer_tokens']} answer tokens -> {path} ({m['seconds']} s)\n"
        f"  weak labels: {share}; per-token NLL: {nll}; co-decoded {m['nll_marginal']:.3f}; "
        f"deferral rate at threshold 0.5: {m['deferral_rate_at_0.5']:.1%}"
    )


@decode_app.command("tune")
def tune(
    head: Annotated[Path, typer.Option("--head", help="A deferral head directory (collab decode train).")],
    data: Annotated[str, typer.Option("--data", help="Validation data: a generation benchmark (e.g. skill:mixed-dev) or a skill's dev split: dev:arith|lists|units|mixed.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for curve.json and curve.png.")],
    base: Annotated[Optional[str], typer.Option("--base", help="The base expert (default: the reference the head was trained with).")] = None,
    assistant: Annotated[Optional[list[str]], typer.Option("--assistant", help="Assistant(s) REF[,REF...] (default: those the head was trained with).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use the first N validation examples (dev splits: draw N).")] = None,
    rates: Annotated[str, typer.Option("--rates", help="Target deferral rates, comma-separated.")] = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
    pick: Annotated[str, typer.Option("--pick", help="'best': the highest accuracy; 'cheapest': the lowest deferral rate within the best's 95% interval.")] = "best",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Pick the threshold eta on validation data: accuracy at quantiles of the deferral rate (curve as PNG + JSON)."""
    from decoding.tune import tune_head

    try:
        shares = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"expected comma-separated numbers, found {rates!r}", param_hint="--rates") from e
    with _tune_bar(quiet) as report:
        result, json_path, png_path = tune_head(head, data, out, base=base, assistants=_refs(assistant or []) or None, limit=limit, rates=shares, pick=pick, progress=report)
    typer.echo(f"{'rate':>6} {'threshold':>9} {'deferred':>8} {'accuracy':>8}  95% interval")
    for p in result.points:
        typer.echo(f"{p.target_rate:6.2f} {p.threshold:9.4f} {p.deferral_rate:8.1%} {p.accuracy:8.3f}  [{p.ci_low:.3f}, {p.ci_high:.3f}]")
    for label, p in (("best", result.best), ("cheapest", result.cheapest)):
        mark = " <- chosen" if label == result.pick else ""
        typer.echo(f"{label}: threshold {p.threshold:.4g} (accuracy {p.accuracy:.3f}, deferral rate {p.deferral_rate:.1%}){mark}")
    typer.echo(f"curve: {json_path}, {png_path}")
    typer.echo(f"in a spec: {{type: codecode, ..., head: {head}, threshold: {result.chosen.threshold:.4g}}}")


@contextlib.contextmanager
def _tune_bar(quiet: bool) -> Iterator[Any]:
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("co-decoding the validation set at each threshold"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()) as bar:
        task = bar.add_task("tune", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


def register(app: typer.Typer) -> None:
    """Add ``collab decode`` to the collab CLI."""
    app.add_typer(decode_app, name="decode")
