"""A CCoE expert on disk: a directory that holds only the expert's own layers.

```
DIR/
  config.json          type "ccoe", version, the expert's name, the base (reference, model
                       type, layers, hidden size), depth (the index of its first own layer),
                       layers (how many it has: num_hidden_layers - depth), the backbone's
                       sha256 fingerprint, training settings, data hash, metrics
  branch.safetensors   the expert's decoder layers depth..N-1 under their keys in the full
                       model (``model.layers.{i}.*``), float32; nothing of the backbone
```

No pickle. ``read_config`` imports no torch, so a spec can be validated cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab.artefacts import ArtefactKind, from_known_fields, read_artefact_config
from collab.errors import CollabError

if TYPE_CHECKING:
    import torch

ARTEFACT_TYPE = "ccoe"
ARTEFACT_VERSION = 1
BRANCH_FILE = "branch.safetensors"
KIND = ArtefactKind(
    ARTEFACT_TYPE,
    ARTEFACT_VERSION,
    ("name", "base", "depth", "layers", "num_hidden_layers", "backbone_sha256"),
    noun="CCoE expert",
    description="a CCoE expert (its own top layers)",
    train_command="collab ccoe train (or collab ccoe push)",
)
reference_url = "https://arxiv.org/abs/2407.11686"


class CCoEArtefactError(CollabError):
    """A CCoE expert directory that is missing, malformed, or does not fit its base."""


@dataclass
class CCoEConfig:
    """What ``config.json`` records. ``base`` is the reference the expert was trained
    on (``zoo:NAME`` or a path); ``backbone_sha256`` fingerprints the tensors it shares
    with that base (``collab.ccoe.model.backbone_fingerprint``); ``depth`` is the index
    of its first own decoder layer and ``layers`` how many it has."""

    name: str
    base: str
    depth: int
    layers: int
    num_hidden_layers: int
    backbone_sha256: str
    hidden_size: int = 0
    model_type: str = ""
    layers_prefix: str = "model.layers"
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    type: str = ARTEFACT_TYPE
    version: int = ARTEFACT_VERSION
    reference_url: str = reference_url

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_config(path: str | Path) -> CCoEConfig:
    """The expert's ``config.json``, checked; CCoEArtefactError naming the file and field otherwise."""
    cfg, raw = read_artefact_config(path, KIND, CCoEArtefactError)
    for key in ("depth", "layers", "num_hidden_layers"):
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CCoEArtefactError(
                f"{cfg}: {key}: expected an integer >= 0, found {v!r}"
            )
    if raw["layers"] < 1 or raw["depth"] + raw["layers"] != raw["num_hidden_layers"]:
        raise CCoEArtefactError(
            f"{cfg}: depth {raw['depth']} + layers {raw['layers']} must equal num_hidden_layers {raw['num_hidden_layers']} (layers >= 1)"
        )
    for key in ("name", "base", "backbone_sha256"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise CCoEArtefactError(
                f"{cfg}: {key}: expected a non-empty string, found {raw[key]!r}"
            )
    return from_known_fields(CCoEConfig, raw)


def save_expert(
    target: Path, tensors: dict[str, torch.Tensor], config: CCoEConfig
) -> None:
    """Write the branch's tensors (float32) and ``config.json`` into ``target``
    (which the caller creates, e.g. with ``collab.io.atomic_directory``)."""
    from safetensors.torch import save_file

    from collab.io import atomic_write_json

    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
        str(target / BRANCH_FILE),
    )
    atomic_write_json(target / "config.json", config.to_dict())


def load_expert_files(path: str | Path) -> tuple[CCoEConfig, dict[str, torch.Tensor]]:
    """(config, the branch's tensors by full-model key) from a directory ``save_expert`` wrote."""
    from safetensors.torch import load_file

    d = Path(path)
    config = read_config(d)
    wpath = d / BRANCH_FILE
    if not wpath.is_file():
        raise CCoEArtefactError(
            f"{d}: {BRANCH_FILE} not found (a CCoE expert holds its layers there)"
        )
    try:
        tensors = load_file(str(wpath))
    except Exception as e:
        raise CCoEArtefactError(
            f"{wpath}: not a readable safetensors file ({' '.join(str(e).split())})"
        ) from e
    return config, tensors


def open_branch(
    model: Any, path: str | Path, name: str | None = None, base_name: str = "the base"
) -> tuple[Any, CCoEConfig]:
    """(the Branch, its config) of the expert directory ``path`` over the base ``model``;
    CCoEArtefactError unless the expert was trained on this base: the same number of
    layers and the same backbone tensors (the fingerprint ``config.json`` records)."""
    from collab.ccoe.model import (
        CCoEModelError,
        backbone_fingerprint,
        load_branch,
        num_layers,
    )

    config, tensors = load_expert_files(path)
    n = num_layers(model)
    if config.num_hidden_layers != n:
        raise CCoEArtefactError(
            f"{path}: the expert '{config.name}' was trained on a base of {config.num_hidden_layers} layers ({config.base}); {base_name} has {n}"
        )
    found = backbone_fingerprint(model, config.depth)
    if found != config.backbone_sha256:
        raise CCoEArtefactError(
            f"{path}: the expert '{config.name}' was trained on another backbone ({config.base}, fingerprint {config.backbone_sha256[:12]}); "
            f"{base_name}'s layers below {config.depth}, embeddings, norm and head give {found[:12]} (load the base it was trained on, in float32)"
        )
    try:
        branch = load_branch(model, name or config.name, config.depth, tensors)
    except CCoEModelError as e:
        raise CCoEArtefactError(f"{path}: {e}") from e
    return branch, config
