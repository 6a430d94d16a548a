"""Running the server: load the spec's models in the background (``/health`` says
when they are ready) while uvicorn serves on the given address."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from collab.server.core import CollabServer, ServeOptions

log = logging.getLogger("collab.server")


def open_server(spec_or_ref: str, options: ServeOptions) -> CollabServer:
    """A CollabServer over a spec file's experts and systems, or over one model
    reference (``zoo:NAME``, a ``.gguf`` file, a model directory) served under its name.
    Reads and checks the spec now; loads nothing yet."""
    from collab.spec import Spec, load_spec

    if str(spec_or_ref).endswith((".yaml", ".yml")):
        spec = load_spec(spec_or_ref)
    else:
        from pathlib import Path

        ref = str(spec_or_ref)
        name = ref[4:] if ref.startswith("zoo:") else Path(ref).name
        spec = Spec({"experts": {name: {"ref": ref}}})
    return CollabServer.from_spec(spec, options)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("collab")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def serve(
    spec_or_ref: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    log_level: str = "info",
    **uvicorn_options: Any,
) -> None:
    """Serve ``spec_or_ref`` until interrupted. The models load in a background
    thread; ``/health`` answers 503 until they are ready. A model that fails to
    load stops the server, and its error is raised here."""
    import uvicorn

    from collab.server.app import create_app

    options = options or ServeOptions()
    _configure_logging(log_level)
    server = open_server(spec_or_ref, options)
    app = create_app(server)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5, **uvicorn_options)
    runner = uvicorn.Server(config)

    def load() -> None:
        try:
            server.load()
        except BaseException as e:  # noqa: BLE001 - reported below, after uvicorn stops
            log.error("loading failed: %s", e)
            runner.should_exit = True
        else:
            log.info("ready: %s on http://%s:%d/v1 (key %s)", ", ".join(server.names), host, port, "required" if options.api_key else "not required")

    threading.Thread(target=load, name="collab-load", daemon=True).start()
    try:
        runner.run()
    finally:
        server.close()
    if server.error is not None:
        raise server.error
