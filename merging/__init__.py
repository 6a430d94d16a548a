"""collab's merging package: ``collab merge`` runs mergekit's YAML configs with
every mergekit method, plus the methods mergekit lacks (``fisher``, ``regmean``,
``weight_matching``, ``ties_fast``) and a coefficient search, on one streaming
engine that calls mergekit's own per-tensor kernels.

``merge(config, out_dir)`` is the library entry point; see docs/merging.md
("The merge engine" for how the modules fit together). Nothing here imports
torch or mergekit until a merge runs.
"""

from __future__ import annotations

from merging.errors import MergeError
from merging.runner import MergeResult, merge

__all__ = ["MergeError", "MergeResult", "merge"]
