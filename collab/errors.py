"""User-facing errors. The CLI prints these as one line and exits non-zero;
anything else is a bug and gets a traceback."""

from __future__ import annotations


class CollabError(Exception):
    """An error caused by the user's input: a file, a field, a reference."""

    exit_code = 1


class SpecError(CollabError, ValueError):
    """A spec file that does not describe valid experts and systems."""

    exit_code = 2


class ModelLoadError(CollabError):
    """A model reference that cannot be loaded (missing, corrupt, unknown zoo name)."""


class RequestError(CollabError, ValueError):
    """A generation request with invalid fields, or one the model cannot take."""


class ContextLengthError(RequestError):
    """A prompt longer than the model's context window."""


class RemoteError(CollabError):
    """A remote OpenAI-compatible endpoint failed or answered with an error."""


class Interrupted(CollabError):
    """A long job stopped by Ctrl-C; the message says what was kept and how to resume."""

    exit_code = 130
