"""collab: make several expert LLMs work as one.

The public API, imported lazily so that ``import collab`` stays fast (no torch):

    from collab import Expert, GenerationRequest, load_spec
    smol = Expert.load("zoo:smollm2-135m-instruct")
    print(smol.generate(GenerationRequest.chat("What is the capital of France?")).text)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Expert": "collab.experts",
    "RemoteExpert": "collab.remote",
    "GenerationRequest": "collab.system",
    "Completion": "collab.system",
    "StreamChunk": "collab.system",
    "Usage": "collab.system",
    "System": "collab.system",
    "BaseSystem": "collab.system",
    "load_spec": "collab.spec",
    "Spec": "collab.spec",
    "register_system_type": "collab.spec",
    "CollabError": "collab.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'collab' has no attribute {name!r}")
