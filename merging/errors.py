"""The merging package's user error."""

from __future__ import annotations

from collab.errors import CollabError


class MergeError(CollabError, ValueError):
    """A merge config or input models that cannot be merged as asked (raised
    before any output tensor is written; the message names the model, the
    tensor or field, and what was expected versus found)."""

    exit_code = 2
