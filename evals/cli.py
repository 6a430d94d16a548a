"""``collab eval``: score systems on benchmarks, collect routing tables, compare runs.

Only typer and the standard library are imported at module level, so that
``collab --help`` stays fast; the runner and models load inside the command.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def _split(value: Optional[str]) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _systems(target: str, names: list[str]) -> tuple[list[str], Any]:
    """(system names, a function name -> System) for a spec file or a bare model ref."""
    from collab.errors import SpecError

    if target.endswith((".yaml", ".yml")):
        from collab.spec import load_spec

        spec = load_spec(target)
        known = spec.names()
        if not names:
            if len(known) != 1:
                raise SpecError(f"{target}: defines {len(known)} systems ({', '.join(known)}); pick with --system or --systems")
            names = known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SpecError(f"{target}: unknown system '{unknown[0]}'; defined: {', '.join(known)}")
        return names, spec.system
    if names:
        raise typer.BadParameter("--system/--systems need a spec file (.yaml) as first argument; a model reference is one system")
    from collab.spec import open_system

    expert = open_system(target)
    return [expert.name], lambda _name: expert


def resume_command(ctx: Any) -> str:
    """The ``collab eval`` command line of ``ctx`` (a click context), rebuilt
    from its parsed parameters: what to run again to resume an interrupted run."""
    parts = ["collab", "eval"]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value is None or value == p.default or value is False:
            continue
        if p.param_type_name == "argument":
            parts += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            continue
        flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def eval_command(
    ctx: typer.Context,
    args: Annotated[Optional[list[str]], typer.Argument(help="SPEC (a spec .yaml, or a model ref: zoo:NAME, a directory, a .gguf); with --compare, run directories.", show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="The system of the spec to evaluate.")] = None,
    systems: Annotated[Optional[str], typer.Option("--systems", help="Several systems, comma-separated: one comparison table.")] = None,
    bench: Annotated[Optional[str], typer.Option("--bench", "-b", help="Benchmark name(s), comma-separated (see --list).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1, help="Score only the first N examples (always the same N).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (results.jsonl, summary.json); rerun to resume. With several runs: OUT/<bench>/<system>.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per call to the system (1: one at a time).")] = 8,
    mode: Annotated[str, typer.Option("--mode", help="auto | generate | loglikelihood (multiple choice).")] = "auto",
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Override the benchmark's generation length (a positive integer).")] = None,
    routing_table: Annotated[Optional[Path], typer.Option("--routing-table", help="Write the routing table (JSONL) of --systems on --bench here.")] = None,
    cost: Annotated[str, typer.Option("--cost", help="Routing-table cost: tokens (prompt + completion) or latency (seconds).")] = "tokens",
    responses: Annotated[bool, typer.Option("--responses", help="Routing table: also keep each row's gold answer and every system's response (for collab fuse thought/distill).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Compare finished run directories (the arguments): table and PNG chart.")] = False,
    plot: Annotated[Path, typer.Option("--plot", help="Where --compare writes its bar chart.")] = Path("eval-compare.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    list_benches: Annotated[bool, typer.Option("--list", help="List the benchmarks and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (collab's, nor transformers' 'Loading weights').")] = False,
) -> None:
    """Score systems on benchmarks (collab eval SPEC --system NAME --bench NAME), collect a routing
    table (--systems a,b --bench X,Y --routing-table OUT.jsonl) or compare runs (--compare DIR...).
    Ctrl-C keeps the finished examples; the same command resumes."""
    if list_benches:
        from evals.benchmarks import benchmark_names, get_benchmark

        rows = []
        for n in benchmark_names():
            if n.startswith("mmlu:") and not as_json:
                continue
            rows.append({"name": n, "description": get_benchmark(n).description})
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['name']:<16} {r['description']}")
            print(f"{'mmlu:<subject>':<16} one MMLU subject (57; 'collab eval --list --json' lists them)")
        return
    if compare:
        from evals.compare import compare_runs, plot_comparison, print_table

        cmp = compare_runs(args or [])
        png = plot_comparison(cmp, plot)
        if as_json:
            print(json.dumps({"cells": cmp["cells"], "plot": str(png)}, indent=2, default=str))
        else:
            print_table(cmp, title="collab eval --compare")
            print(f"chart: {png}")
        return
    if not args or len(args) != 1:
        raise typer.BadParameter("expected one SPEC (a spec .yaml or a model reference)")
    if system and systems:
        raise typer.BadParameter("give --system or --systems, not both")
    if responses and routing_table is None:
        raise typer.BadParameter("--responses belongs to --routing-table (it adds the responses to the table's rows)")
    benches = _split(bench)
    if not benches:
        raise typer.BadParameter("--bench is required (see 'collab eval --list')")
    from evals.benchmarks import get_benchmark

    for b in benches:
        get_benchmark(b)  # unknown names fail before any model loads
    if quiet:
        from collab.io import silence_library_progress

        silence_library_progress()
    names, build = _systems(args[0], _split(systems) or _split(system))
    if routing_table is not None:
        from evals.routing import collect_routing_table

        info = collect_routing_table(
            build, names, benches, routing_table, limit=limit, runs_dir=out, cost=cost, batch_size=batch_size, mode=mode, progress=not quiet,
            resume_command=resume_command(ctx), responses=responses,
        )
        if as_json:
            print(json.dumps(info, indent=2))
        else:
            print(f"routing table: {info['out']} ({info['rows']} rows; {', '.join(f'{k}: {v}' for k, v in info['tasks'].items())}); runs in {info['runs_dir']}")
            for b, per in info["scores"].items():
                print(f"  {b}: " + ", ".join(f"{s}={v:.3f}" for s, v in per.items()))
        return
    from evals.compare import print_table
    from evals.runner import evaluate

    single = len(names) == 1 and len(benches) == 1
    summaries = []
    for b in benches:
        for n in names:
            run_dir = None
            if out is not None:
                run_dir = out if single else out / b.replace(":", "-") / n
            res = evaluate(build(n), b, limit=limit, out_dir=run_dir, batch_size=batch_size, mode=mode, max_tokens=max_tokens, progress=not quiet, resume_command=resume_command(ctx))
            summaries.append(res.summary())
    if as_json:
        print(json.dumps(summaries if not single else summaries[0], indent=2, default=str))
        return
    cells: dict[str, dict[str, Any]] = {}
    for s in summaries:
        cells.setdefault(s["benchmark"], {})[s["system"]] = s
    print_table({"benchmarks": list(cells), "systems": list(dict.fromkeys(s["system"] for s in summaries)), "cells": cells})
    for s in summaries:
        extra = ", ".join(f"{m}={v['mean']:.3f}" for m, v in s["metrics"].items())
        cost = f" (cost: {s['cost']['tokens']} tokens read or written by all its models, x{s['cost']['ratio']:.1f})" if s.get("cost") else ""
        sys.stdout.write(f"{s['benchmark']} · {s['system']}: {extra}; mode {s['mode']}; {s['tokens']['total']} tokens{cost}; {s['seconds']:.1f} s\n")


def register(app: typer.Typer) -> None:
    """Add ``collab eval`` to the collab command."""
    app.command("eval")(eval_command)
