"""The ``collab`` command. Thin: each command parses its arguments and calls one
library function. Nothing heavy is imported at start-up, so ``collab --help``
is fast; torch loads only inside the commands that need it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="collab",
    help="Make several expert LLMs work as one: route, merge and evaluate real models, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The offline models and the domain experts built from them.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


@app.command()
def generate(
    ref_or_spec: Annotated[str, typer.Argument(help="A model reference (zoo:NAME, a .gguf file, a model directory) or a spec .yaml.")],
    prompt: Annotated[str, typer.Argument(help="The user message (or raw text with --raw).")],
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="Which system of the spec answers.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy and deterministic.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop sequence (repeatable).")] = None,
    raw: Annotated[bool, typer.Option(help="Continue the prompt as raw text, without the chat template.")] = False,
    show_trace: Annotated[bool, typer.Option("--trace", help="Print the completion's trace as JSON to stderr.")] = False,
) -> None:
    """Stream one answer from an expert or a system to the terminal."""
    from collab.system import GenerationRequest

    req = GenerationRequest(
        messages=None if raw else [{"role": "user", "content": prompt}],
        prompt=prompt if raw else None,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop or [],
        stream=True,
    )
    from collab.spec import open_system

    sys_ = open_system(ref_or_spec, system)
    last = None
    for chunk in sys_.stream(req):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if show_trace and last is not None:
        info = {"finish_reason": last.finish_reason, "usage": last.usage.to_dict() if last.usage else None, "trace": last.trace}
        sys.stderr.write(json.dumps(info) + "\n")


@zoo_app.command("list")
def zoo_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show each zoo model: kind, size, whether it is installed, and how to install it."""
    from collab import zoo

    rows = []
    for e in zoo.entries().values():
        size = zoo.size_of(e)
        rows.append(
            {
                "name": f"zoo:{e.name}",
                "kind": e.kind,
                "installed": e.installed,
                "size_mb": round(size / 1e6, 1) if size else e.approx_mb,
                "install": e.install,
                "description": e.description,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="collab zoo")
    for col in ("name", "kind", "size", "installed", "install / description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["kind"],
            f"{r['size_mb']} MB",
            "[green]yes[/]" if r["installed"] else "[red]no[/]",
            r["description"] if r["installed"] else r["install"],
        )
    Console().print(table)


@zoo_app.command("build")
def zoo_build(
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Build only this domain expert (repeatable), e.g. smol-arith.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the adapters here instead of the shipped zoo directory.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Override the number of training steps.")] = None,
) -> None:
    """Fine-tune the zoo's domain experts (LoRA on SmolLM2-135M-Instruct); resumes if interrupted."""
    from collab.zoo_build import build_zoo

    for path in build_zoo(only=only, out_dir=out, steps=steps):
        info = json.loads((path / "collab_train.json").read_text())
        typer.echo(f"{info['name']}: {path} ({info['seconds']} s, final loss {info['final_loss']:.4f})")


@app.command()
def serve(
    spec: Annotated[str, typer.Argument(help="A spec .yaml (each expert and system becomes a model) or one model reference (zoo:NAME, .gguf, a directory).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="COLLAB_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (default: $COLLAB_API_KEY; none: open).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests to one local expert decoded together.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a request waits for others to share its batch.")] = 10.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Most requests waiting per local expert (then 429).")] = 64,
    continuous: Annotated[bool, typer.Option("--continuous/--no-continuous", help="Let waiting requests join a running batch between steps (experts without sliding-window caches).")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve every expert and system of a spec as an OpenAI-compatible API (see docs/serve.md)."""
    from collab.server import ServeOptions
    from collab.server import serve as run_server

    options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, api_key=api_key or None, continuous=continuous)
    run_server(spec, host=host, port=port, options=options, log_level=log_level)


#: Modules that add commands to ``app``, each through ``register(app)``. They
#: import only typer at module level so that ``collab --help`` stays fast.
COMMAND_MODULES = ("evals.cli", "routers.cli", "merging.cli", "decoding.cli", "collab.latent.cli", "collab.ccoe.cli")


def _register_commands() -> None:
    import importlib

    for module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(app)


_register_commands()


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit.

    Usage errors print as typer prints them (usage line, the option at fault,
    exit 2); CollabErrors print ``error: MESSAGE`` and exit with their code;
    Ctrl-C exits 130. Anything else is a bug: one line and a hint to rerun
    with ``collab --debug`` for the traceback."""
    from collab.errors import CollabError

    # typer >= 0.2x ships its own copy of click; its exceptions are found from a public class
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

    try:
        code = app(standalone_mode=False)
    except click_exception as e:
        e.show()  # plain text, not a rich box: one unwrapped line that scripts can grep
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except CollabError as e:
        if _state["debug"]:
            raise
        prefix = "interrupted" if e.exit_code == 130 else "error"
        sys.stderr.write(f"{prefix}: {e}\n")
        sys.exit(e.exit_code)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if _state["debug"]:
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the one place errors meet the user
        if _state["debug"]:
            raise
        hint = "" if _state["debug"] else "; rerun as 'collab --debug ...' for the traceback"
        sys.stderr.write(f"error: {type(e).__name__}: {e} (an unexpected error{hint})\n")
        sys.exit(1)
    if code == 130:  # typer turns a KeyboardInterrupt inside a command into Exit(130)
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
