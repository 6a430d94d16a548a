"""Reading a trained artefact's ``config.json`` (a deferral head, a latent
mixture): the directory, the JSON, its type tag and version and the keys it must
have, each checked with an error naming the file and the field. Imports no
torch, so a spec can be validated cheaply.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from collab.errors import CollabError

T = TypeVar("T")


@dataclass(frozen=True)
class ArtefactKind:
    """What one kind of artefact's ``config.json`` must say, and how errors name it."""

    type: str
    """The ``type`` tag."""
    version: int
    """The one ``version`` this collab reads."""
    required: tuple[str, ...]
    """Keys that must be present."""
    noun: str
    """What it is, in errors: 'deferral head', 'mixture'."""
    description: str
    """What the type tag means, in errors: 'a deferral head'."""
    train_command: str
    """How to make one: 'collab decode train'."""


def read_artefact_config(directory: str | Path, kind: ArtefactKind, error: type[CollabError]) -> tuple[Path, dict[str, Any]]:
    """(the config.json path, its checked contents); ``error`` naming the file and
    field when the directory, the file, the JSON, the type, the version or a
    required key is not as ``kind`` says."""
    d = Path(directory)
    path = d / "config.json"
    hint = f"train one with: {kind.train_command}"
    if not d.is_dir():
        raise error(f"{d}: {kind.noun} directory not found ({hint})")
    if not path.is_file():
        raise error(f"{d}: no config.json (not a trained {kind.noun}; {hint})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(raw, dict) or raw.get("type") != kind.type:
        found = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
        raise error(f"{path}: type: expected '{kind.type}' ({kind.description}), found {found!r}")
    if raw.get("version") != kind.version:
        raise error(f"{path}: version: this collab reads version {kind.version}, found {raw.get('version')!r}")
    for key in kind.required:
        if key not in raw:
            raise error(f"{path}: {key}: missing")
    return path, raw


def check_output(out: Path, overwrite: bool, what: str, new: str) -> None:
    """CollabError unless a trainer may write ``out``: absent, or with ``overwrite`` a
    directory with a config.json (``what`` names such a directory in the error, e.g. 'a
    deferral head'; ``new`` the thing being written, e.g. 'the new head')."""
    if not out.exists():
        return
    if not overwrite:
        raise CollabError(f"{out}: already exists (pass --overwrite to replace it once {new} is complete)")
    if not (out / "config.json").is_file():
        raise CollabError(f"{out}: exists and is not {what}; refusing to overwrite it")


def from_known_fields(cls: type[T], raw: dict[str, Any]) -> T:
    """``cls(**raw)`` over the dataclass's own fields (keys a newer writer added are ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in raw.items() if k in known})
