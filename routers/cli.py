"""``collab route train|eval|ask``. Imports only typer and the stdlib at module level."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Annotated, Any, Iterator, Optional

import typer

route_app = typer.Typer(help="Learned query routers: train on routing tables, evaluate, route one prompt, add an expert from demonstrations.", no_args_is_help=True)

_DATA_HELP = "A routing table: a canonical .jsonl, or a shorthand: llmrouter, routellm-mmlu, routellm-gsm8k (repeatable)."


_DEVICE_HELP = "Where the router's neural encoder runs: cpu, cuda, cuda:N, mps or auto (CUDA when present)."


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show the library's warnings (e.g. a table's missing costs) as one ``warning: ...``
    line on stderr, without Python's file, line number and source line."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        sys.stderr.write(f"warning: {message}\n")

    from routers.table import TableWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", TableWarning)  # every time, also when one process runs several commands
        warnings.showwarning = show
        yield


def _parse_options(options: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in options or []:
        if "=" not in o:
            raise typer.BadParameter(f"--option: expected KEY=VALUE, found {o!r}")
        k, v = o.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = tuple(v.split(",")) if "," in v else v
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


@route_app.command("train")
def train(
    data: Annotated[list[str], typer.Option("--data", help=_DATA_HELP)],
    out: Annotated[str, typer.Option("--out", help="Directory to write the trained router to.")],
    router: Annotated[str, typer.Option("--router", help="Router kind: auto (default: chosen by validation under simulated shift), classifier, knn, logreg, mlp, mf, subject, bert, ensemble, partition, guarded, population (new experts from demonstrations: route add-expert), best-single, random, oracle.")] = "auto",
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Router option KEY=VALUE, e.g. -o k=40 -o encoder=tfidf (repeatable).")] = None,
    test_size: Annotated[float, typer.Option(help="Hold out this share of queries (stratified by task) for `route eval`.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for the split and training.")] = 0,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it is a trained router directory (only once the new one is complete).")] = False,
) -> None:
    """Train a router on one or more routing tables and save it as config.json + safetensors."""
    from routers.api import train_router

    with _warnings_as_lines():
        r, held = train_router(data, router, out, _parse_options(option), test_size=test_size, seed=seed, device=device, overwrite=overwrite, log=lambda m: typer.echo(m, err=True))
    if "auto" in r.meta:
        typer.echo(f"auto: chose {r.meta['auto']['chosen']}: {r.meta['auto']['reason']}")
    msg = f"trained {r.key} router on {r.meta['train_queries']} queries, experts: {', '.join(r.experts)} -> {out}"
    if held is not None:
        msg += f" ({len(held)} held out for eval)"
    else:
        msg += " (none held out: `route eval` needs another table, or --all to score these training rows)"
    typer.echo(msg)


@route_app.command("eval")
def evaluate(
    router: Annotated[str, typer.Option("--router", help="A trained router directory.")],
    data: Annotated[list[str], typer.Option("--data", help=_DATA_HELP)],
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write the cost-quality curve to this PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    all_rows: Annotated[bool, typer.Option("--all", help="Score every row, also those the router was trained on (with a warning): fit, not routing.")] = False,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
) -> None:
    """Score a router on the rows it was not trained on: each expert, best single, random at equal cost, oracles, the router (95% intervals)."""
    from routers.api import evaluate_router

    with _warnings_as_lines():
        ev = evaluate_router(router, data, plot=plot, heldout=not all_rows, device=device)
    d = ev.to_json()
    if as_json:
        typer.echo(json.dumps(d, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"router {d['router']} on {d['queries']} {'held-out ' if d['rows'] == 'held-out' else ''}queries" + (f", {d['training_rows']} of them training rows" if d["training_rows"] else ""))
    for col in ("system", "accuracy", "95% interval", "mean cost", "share"):
        t.add_column(col)
    for e, x in d["experts"].items():
        t.add_row(e, f"{x['accuracy']:.4f}", f"[{x['low']:.4f}, {x['high']:.4f}]", f"{x['cost']:.4g}", f"{x['share']:.1%}")
    t.add_row("best single", f"{d['best_single']:.4f}", "", f"{d['best_single_cost']:.4g}", d["best_single_expert"])
    t.add_row("random at equal cost", f"{d['random_equal_cost']:.4f}", "", f"{d['cost']:.4g}", "")
    t.add_row("per-task oracle", f"{d['task_oracle']:.4f}", "", "", "")
    t.add_row("per-query oracle", f"{d['oracle']:.4f}", "", "", "")
    t.add_row(f"[bold]router ({d['router']})[/]", f"[bold]{d['accuracy']:.4f}[/]", f"[{d['accuracy_low']:.4f}, {d['accuracy_high']:.4f}]", f"{d['cost']:.4g}", "")
    console = Console()
    console.print(t)
    console.print(
        f"vs best single: {d['delta']:+.4f} [{d['delta_low']:+.4f}, {d['delta_high']:+.4f}]; "
        f"gap closed {d['gap_closed']:.1%} [{d['gap_closed_low']:.1%}, {d['gap_closed_high']:.1%}]; cost-quality AUC {d['auc']:.4f}"
    )
    if "apgr" in d:
        console.print(f"strong {d['strong']}, weak {d['weak']}: APGR {d['apgr']:.3f} (random {d['random_apgr']:.3f}), CPT(50%) {d['cpt50']:.1%}, CPT(80%) {d['cpt80']:.1%}")
    if d.get("auto"):
        a = d["auto"]
        console.print(f"chosen by --router auto: {a['chosen']} ({a['reason']})")
        ct = Table(title="auto: validation under simulated shift, on the training table (share of the best-single-to-oracle gap closed)")
        for col in ("candidate", "grouped", "reweighted mix", "worst mix", "leave-one-task-out", "mean"):
            ct.add_column(col)
        pct = lambda c, k: f"{c[k]:.1%}" if k in c else "-"  # noqa: E731
        for c in a["candidates"]:
            ct.add_row(("* " if c["name"] == a["chosen"] else "") + c["name"], pct(c, "grouped"), pct(c, "reweighted"), pct(c, "reweighted_worst"), pct(c, "loto"), pct(c, "score"))
        console.print(ct)
    if d.get("adapted"):
        a = d["adapted"]
        console.print(f"adapted ({a['method']}) on {a['prompts']} prompts: {a['reason']}")
        console.print("  " + ", ".join(f"{e} {v['train']:.3f} -> {v['new']:.3f}" for e, v in a["priors"].items()))
    for n in d.get("notes", []):
        console.print(f"[yellow]note:[/] {n}")
    if plot:
        console.print(f"curve written to {plot}")


@route_app.command("adapt")
def adapt(
    router: Annotated[str, typer.Option("--router", help="A trained router directory.")],
    prompts: Annotated[str, typer.Option("--prompts", help="JSONL of the new traffic's prompts, one {\"prompt\": ...} per line (no labels needed).")],
    out: Annotated[str, typer.Option("--out", help="Directory to write the adapted router to.")],
    data: Annotated[Optional[list[str]], typer.Option("--data", help="The router's training table(s) (path or shorthand; repeatable), for --method tilt; default: the tables the router records, when they are shorthands (llmrouter, ...).")] = None,
    method: Annotated[Optional[str], typer.Option(help="'tilt' (label shift on the experts' joint correctness, tested against a change of prompt mix; needs the training table, and is the default when it is at hand: --data, or the shorthand table the router records) or 'em' (per-expert EM, MAP by default; the default otherwise).")] = None,
    min_change: Annotated[float, typer.Option(help="em: adjust only if some expert's estimated prior moved by at least this much.")] = 0.02,
    strength: Annotated[Optional[float], typer.Option(help="em: pseudo-observations of the training rates (a MAP estimate); default: the router's training queries; 0: plain EM.")] = None,
    folds: Annotated[int, typer.Option(help="tilt: refits of the router for its out-of-fold predictions.")] = 5,
    clusters: Annotated[int, typer.Option(help="tilt: k-means cells of the training prompts whose proportions test for a change of prompt mix.")] = 16,
    components: Annotated[int, typer.Option(help="tilt: principal components of the training prompts whose means test for it too.")] = 16,
    encoder: Annotated[str, typer.Option(help="tilt: encoder of the cells and components.")] = "minilm",
    ridge: Annotated[float, typer.Option(help="tilt: penalty on the tilt (in units of the moment distance).")] = 1.0,
    spread: Annotated[float, typer.Option(help="tilt: penalty on differences between the experts' tilts.")] = 20.0,
    alpha: Annotated[float, typer.Option(help="tilt: level of the prompt-shape and fit tests.")] = 0.1,
    min_gain: Annotated[float, typer.Option(help="tilt: apply only if the adjusted predictions route the training rows, reweighted to the estimated shift, better by at least this many standard errors.")] = 1.0,
    one_expert: Annotated[bool, typer.Option("--one-expert/--no-one-expert", help="tilt: first try the model in which one expert's rate moved against the others (re-expressing the predictions under the rates it implies), then the free tilt.")] = True,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it is a trained router directory.")] = False,
) -> None:
    """Re-estimate, without labels, how often each expert is right on new prompts and adjust the router's predictions to it (--method tilt first tests that it is the rates that moved, not the prompt mix, and that the adjustment routes better)."""
    from routers.adapt import adapt_router

    with _warnings_as_lines():
        ar = adapt_router(router, prompts, out, min_change=min_change, overwrite=overwrite, device=device, strength=strength, method=method, data=data or (), folds=folds, clusters=clusters, components=components, encoder=encoder, ridge=ridge, spread=spread, alpha=alpha, min_gain=min_gain, one_expert=one_expert)
    a = ar.meta["adapted"]
    how = f"{a['iterations']} EM iterations" if "folds" not in a else f"tilt, {a['folds']} refits, {a['clusters']} cells"
    if a.get("calibration", {}).get("from") == "recorded":
        how += f"; calibrated on {', '.join(a['calibration']['tables'])}, the training table the router records"
    typer.echo(f"adapted {a['base']} router on {a['prompts']} prompts ({how}): {a['reason']} -> {out}")
    typer.echo("how often each expert is right, training -> estimated" + ("" if a["applied"] else " (not applied)") + ":")
    for e, v in a["priors"].items():
        typer.echo(f"  {e:40s} {v['train']:.4f} -> {v['new']:.4f} ({v['change']:+.4f})")
    if method is None and "folds" not in a:
        typer.echo("(the per-expert EM: the router's training table was not at hand; with it, --data TABLE, the method is the tilt, which tests that the rates moved before it adjusts)")


@route_app.command("add-expert")
def add_expert(
    router: Annotated[str, typer.Option("--router", help="A population router directory (collab route train --router population).")],
    expert: Annotated[str, typer.Option("--expert", help="The new expert's name (as in the demonstrations' scores and in specs).")],
    demos: Annotated[str, typer.Option("--demos", help="JSONL routing-table rows whose scores hold the new expert's score (other experts' scores may be absent).")],
    out: Annotated[str | None, typer.Option("--out", help="Write the router with the new expert here instead of in place.")] = None,
    pseudo_labels: Annotated[int | None, typer.Option("--pseudo-labels", help="Also pseudo-label this many of the router's training queries for the new expert (label spreading from the demonstrations); default: the router's pseudo_labels option.")] = None,
    cost: Annotated[float | None, typer.Option("--cost", help="The new expert's cost per query for cost policies (default: its mean cost in the demonstrations, else 1).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it is a trained router directory.")] = False,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
) -> None:
    """Add an expert to a population router from a few demonstrations, changing no weight (L2D-Pop)."""
    from collab.io import sha256_file
    from routers.demonstrations import add_expert as add_fn

    with _warnings_as_lines():
        r = add_fn(router, expert, demos, out=out, pseudo_labels=pseudo_labels, cost=cost, overwrite=overwrite, device=device)
    info = r.ctx_info[-1]
    dest = out or router
    typer.echo(f"added expert '{expert}' from {info['demonstrations']} demonstrations" + (f" and {info['pseudo_labels']} pseudo-labelled queries" if info["pseudo_labels"] else "") + f" -> {dest}")
    typer.echo(f"experts: {', '.join(r.experts)}; weights unchanged (router.safetensors sha256 {sha256_file(f'{dest}/router.safetensors')[:16]})")


@route_app.command("ask")
def ask(
    router: Annotated[str, typer.Option("--router", help="A trained router directory.")],
    prompt: Annotated[str, typer.Argument(help="The prompt to route.")],
    policy: Annotated[str, typer.Option(help="'best', or 'cost:LAMBDA' (quality - lambda x the experts' mean training cost).")] = "best",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
) -> None:
    """Route one prompt: the chosen expert, every expert's predicted score and why."""
    from routers.api import ask as ask_fn

    pol: Any = policy
    if policy.startswith("cost:"):
        try:
            pol = {"type": "cost", "lambda": float(policy.split(":", 1)[1])}
        except ValueError:
            raise typer.BadParameter(f"expected 'best' or 'cost:LAMBDA' with a number, found {policy!r}", param_hint="--policy") from None
    with _warnings_as_lines():
        res = ask_fn(router, prompt, pol, device=device)
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"routed to: {res['routed_to']}")
    typer.echo(f"why: {res['reason']}")
    costs = res.get("costs")
    if costs:
        typer.echo(f"costs: {res['costs_from']}")
    for e in res["ranking"]:
        typer.echo(f"  {e:40s} {res['scores'][e]:.4f}" + (f"  cost {costs[e]:g}" if costs else ""))


def register(app: typer.Typer) -> None:
    """Add ``collab route`` to the main app."""
    app.add_typer(route_app, name="route")
