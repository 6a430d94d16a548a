"""The trained mixture: a directory that holds only what was trained.

```
DIR/
  config.json           type "mot", version, the experts (name, ref, hidden size, layers,
                        cut points), stacks, top_k, latent width, heads, the router's
                        encoder, hyper-parameters, training data hash, metrics
  weights.safetensors   "router.*" (the MLP) and "interactions.*" (every expert's
                        interaction layers); nothing of the experts themselves
```

No pickle; ``read_config`` imports no torch, so a spec can be validated cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab.artefacts import ArtefactKind, from_known_fields, read_artefact_config
from collab.errors import CollabError

if TYPE_CHECKING:
    from collab.latent.model import Interactions
    from collab.latent.router import LatentRouter

ARTEFACT_TYPE = "mot"
ARTEFACT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
KIND = ArtefactKind(
    ARTEFACT_TYPE, ARTEFACT_VERSION, ("experts", "stacks", "top_k", "latent_dim", "heads", "encoder"),
    noun="mixture", description="a Mixture-of-Thoughts checkpoint", train_command="collab latent train",
)


class LatentArtefactError(CollabError):
    """A mixture directory that is missing, malformed, or does not fit the experts."""


@dataclass
class LatentConfig:
    """What ``config.json`` records. ``experts`` are ``{"name", "ref", "hidden_size",
    "layers", "cuts"}`` in the router's order; ``encoder`` the router's frozen
    query encoder; ``training`` the hyper-parameters; ``data`` the source, size and
    sha256 of the training data."""

    experts: list[dict[str, Any]]
    stacks: int
    top_k: int
    latent_dim: int
    heads: int
    encoder: dict[str, Any]
    router_hidden: int = 256
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    type: str = ARTEFACT_TYPE
    version: int = ARTEFACT_VERSION
    reference_url: str = "https://arxiv.org/abs/2509.21164"

    @property
    def names(self) -> list[str]:
        return [str(e["name"]) for e in self.experts]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_config(path: str | Path) -> LatentConfig:
    """The mixture's ``config.json``, checked; LatentArtefactError naming the file otherwise."""
    cfg, raw = read_artefact_config(path, KIND, LatentArtefactError)
    experts = raw["experts"]
    if not isinstance(experts, list) or len(experts) < 2 or not all(isinstance(e, dict) and "name" in e for e in experts):
        raise LatentArtefactError(f"{cfg}: experts: expected a list of at least two {{name, ref, ...}}, found {experts!r}")
    return from_known_fields(LatentConfig, raw)


def save_mixture(target: Path, router: "LatentRouter", interactions: "Interactions", config: LatentConfig) -> None:
    """Write the trained parameters and ``config.json`` into ``target`` (which the
    caller creates, e.g. with ``collab.io.atomic_directory``)."""
    from safetensors.torch import save_file

    from collab.io import atomic_write_json

    tensors = {f"router.{k}": v for k, v in router.state_dict().items()}
    tensors.update({f"interactions.{k}": v for k, v in interactions.state_dict().items()})
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(target / WEIGHTS_FILE))
    atomic_write_json(target / "config.json", config.to_dict())


def load_mixture(path: str | Path) -> tuple["LatentRouter", "Interactions", LatentConfig]:
    """(router, interaction layers, config) from a directory ``save_mixture`` wrote."""
    from safetensors.torch import load_file

    from collab.latent.model import Interactions
    from collab.latent.router import LatentRouter, make_encoder

    d = Path(path)
    config = read_config(d)
    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        raise LatentArtefactError(f"{d}: {WEIGHTS_FILE} not found")
    try:
        tensors = load_file(str(wpath))
    except Exception as e:
        raise LatentArtefactError(f"{wpath}: not a readable safetensors file ({' '.join(str(e).split())})") from e
    dim = int(tensors["router.net.0.weight"].shape[1]) if "router.net.0.weight" in tensors else make_encoder(config.encoder).dim
    router = LatentRouter(dim, len(config.experts), hidden=int(config.router_hidden))
    shapes = [(int(e["hidden_size"]), int(e["layers"])) for e in config.experts]
    interactions = Interactions(shapes, int(config.stacks), int(config.latent_dim), int(config.heads))
    for prefix, module in (("router.", router), ("interactions.", interactions)):
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise LatentArtefactError(f"{wpath}: {prefix.rstrip('.')} weights do not match config.json ({' '.join(str(e).split())[:300]})") from e
        if missing or unexpected:
            bad = (missing or unexpected)[0]
            raise LatentArtefactError(
                f"{wpath}: {prefix}{bad} is {'missing' if missing else 'unexpected'}; the weights do not match config.json "
                f"({len(config.experts)} experts, {config.stacks} stacks, latent {config.latent_dim})"
            )
    return router.eval(), interactions.eval(), config
