"""collab serve: every expert and system of a spec as an OpenAI-compatible model.

``serve(spec)`` runs the server (``collab serve`` calls it); ``create_app`` and
``CollabServer`` build the same app in-process, e.g. for tests::

    server = CollabServer.from_spec(load_spec("examples/zoo.yaml"))
    server.load()
    app = create_app(server)

See docs/serve.md for the endpoints, the error contract and deployment.
"""

from collab.server.app import create_app
from collab.server.core import CollabServer, ServeOptions
from collab.server.run import serve

__all__ = ["CollabServer", "ServeOptions", "create_app", "serve"]
