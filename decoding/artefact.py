"""The trained Co-LLM artefact: a directory that holds only what was trained.

```
DIR/
  config.json          type "colm-head", version, the experts (name + ref), hyper-parameters,
                       training data hash, losses
  head.safetensors     "weight": (k, H) float32, the deferral vectors
  adapter/             only with --train-base lora: the base's LoRA (PEFT safetensors + JSON)
```

No pickle anywhere; the config is plain JSON. ``read_config`` is cheap (no
torch) so spec validation can check a head without loading it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab.artefacts import ArtefactKind, from_known_fields, read_artefact_config
from collab.errors import CollabError

if TYPE_CHECKING:
    from decoding.head import DeferralHead

ARTEFACT_TYPE = "colm-head"
ARTEFACT_VERSION = 1
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"
KIND = ArtefactKind(
    ARTEFACT_TYPE, ARTEFACT_VERSION, ("base", "assistants", "hidden_size", "vocab_size"),
    noun="deferral head", description="a deferral head", train_command="collab decode train",
)


class HeadError(CollabError):
    """A deferral-head directory that is missing, malformed, or does not fit the experts."""


@dataclass
class HeadConfig:
    """What ``config.json`` records. ``base`` and ``assistants`` are ``{"name", "ref"}``
    (the expert's name and the reference it was loaded from); ``training`` the
    hyper-parameters; ``data`` the source, sizes and sha256 of the training data."""

    base: dict[str, Any]
    assistants: list[dict[str, Any]]
    hidden_size: int
    vocab_size: int
    train_base: str = "none"
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    type: str = ARTEFACT_TYPE
    version: int = ARTEFACT_VERSION
    reference_url: str = "https://arxiv.org/abs/2403.03870"

    @property
    def n_assistants(self) -> int:
        return len(self.assistants)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def read_config(head_dir: str | Path) -> HeadConfig:
    """The head's ``config.json``, checked; HeadError naming the file otherwise."""
    path, raw = read_artefact_config(head_dir, KIND, HeadError)
    if not isinstance(raw["assistants"], list) or not raw["assistants"]:
        raise HeadError(f"{path}: assistants: expected a non-empty list of {{name, ref}}, found {raw['assistants']!r}")
    return from_known_fields(HeadConfig, raw)


def save_head(target: Path, head: "DeferralHead", config: HeadConfig, adapter_model: Any = None) -> None:
    """Write ``head`` (and the base's LoRA, a PEFT model, if given) into the directory
    ``target``, which the caller creates (``collab.io.atomic_directory``)."""
    from safetensors.torch import save_file

    from collab.io import atomic_write_json

    save_file({"weight": head.weight.detach().float().contiguous().cpu()}, str(target / HEAD_FILE))
    if adapter_model is not None:
        adapter_model.save_pretrained(str(target / ADAPTER_DIR), safe_serialization=True)
        (target / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's empty model card
        cfg_path = target / ADAPTER_DIR / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = config.base.get("ref")  # a portable name, not this machine's path
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    atomic_write_json(target / "config.json", config.to_dict())


def load_head(head_dir: str | Path) -> tuple["DeferralHead", HeadConfig, Path | None]:
    """(the head, its config, the base's LoRA adapter directory or None)."""
    from safetensors import safe_open

    from decoding.head import DeferralHead

    d = Path(head_dir)
    config = read_config(d)
    path = d / HEAD_FILE
    if not path.is_file():
        raise HeadError(f"{d}: {HEAD_FILE} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            weight = f.get_tensor("weight")
    except Exception as e:  # noqa: BLE001 - SafetensorError derives from Exception only
        raise HeadError(f"{path}: not a readable safetensors file with a 'weight' tensor ({' '.join(str(e).split())})") from e
    want = (config.n_assistants, int(config.hidden_size))
    if tuple(weight.shape) != want:
        raise HeadError(f"{path}: weight has shape {tuple(weight.shape)}; config.json says {want} (assistants x hidden size)")
    head = DeferralHead(config.hidden_size, config.n_assistants)
    head.weight.data.copy_(weight.float())
    head.eval()
    adapter = d / ADAPTER_DIR
    if config.train_base == "lora":
        if not (adapter / "adapter_model.safetensors").is_file():
            raise HeadError(f"{d}: trained with --train-base lora, but {ADAPTER_DIR}/adapter_model.safetensors is missing")
        return head, config, adapter
    return head, config, None
