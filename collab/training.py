"""What collab's trainers share (``collab decode train``, ``collab latent train``):
the resumable checkpoint beside the output, the seeded batch order that lets a
resumed run see the same batches, and loading the experts they train over.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from collab.errors import CollabError

if TYPE_CHECKING:
    import torch

    from collab.experts import Expert

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"


def batch_order(step: int, n: int, batch_size: int, seed: int, stage: str | None = None) -> list[int]:
    """The items of ``step``: a seeded shuffle of ``range(n)`` per epoch (and per
    ``stage``, when given), so a step's batch depends only on the step (a resumed
    run sees the same batches)."""
    import random

    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(f"{seed}:{epoch}" if stage is None else f"{seed}:{stage}:{epoch}").shuffle(order)
    return order[offset * batch_size : (offset + 1) * batch_size] or order[:batch_size]


def load_expert(ref: "str | Expert") -> "Expert":
    """``ref`` itself if it is an Expert, else ``Expert.load(ref)``."""
    from collab.experts import Expert

    return ref if isinstance(ref, Expert) else Expert.load(ref)


class TrainingCheckpoint:
    """The hidden directory beside a trainer's output (``.OUT.checkpoint``) where an
    interrupted run resumes.

    It holds ``state.json`` (the trainer's progress, with a fingerprint of its
    settings, experts and data: a rerun with others refuses to resume),
    ``weights.safetensors`` (the trained tensors, under the trainer's names, and
    the optimizer's state under ``optimizer.*``), and whatever else the trainer
    caches there (``path(name)``)."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.dir = out.parent / f".{out.name}.checkpoint"
        self.fingerprint = fingerprint

    def path(self, name: str) -> Path:
        """A file of the checkpoint."""
        return self.dir / name

    def write(self, name: str, writer: Callable[[Path], None]) -> Path:
        """Write the file ``name`` with ``writer(path)``, atomically (a temporary
        file renamed into place); returns its path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{name}.tmp"
        writer(tmp)
        return tmp.replace(self.dir / name)

    def state(self) -> dict[str, Any] | None:
        """The saved state, None without one; CollabError if it is another run's."""
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise CollabError(
                f"{self.dir}: a checkpoint of a run with other settings, experts or data; "
                "rerun with the same ones to resume, or delete it to start over"
            )
        return state

    def save(self, state: dict[str, Any], tensors: dict[str, "torch.Tensor"], optimizer: Any) -> None:
        """Write ``tensors`` (copied), the optimizer's state and ``state``; the
        weights first, so a state.json always describes complete weights."""
        import torch
        from safetensors.torch import save_file

        from collab.io import atomic_write_json

        out = {k: v.detach().clone() for k, v in tensors.items()}
        for i, st in optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"optimizer.{i}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v))
        self.write(WEIGHTS_FILE, lambda path: save_file({k: v.contiguous() for k, v in out.items()}, str(path)))
        atomic_write_json(self.dir / STATE_FILE, {**state, "fingerprint": self.fingerprint})

    def restore(self, optimizer: Any) -> dict[str, "torch.Tensor"]:
        """Load the optimizer's state into ``optimizer``; return the trained tensors."""
        from safetensors.torch import load_file

        tensors = load_file(str(self.dir / WEIGHTS_FILE))
        sd = optimizer.state_dict()
        for key, v in tensors.items():
            if key.startswith("optimizer."):
                _, i, k = key.split(".", 2)
                sd["state"].setdefault(int(i), {})[k] = v
        optimizer.load_state_dict(sd)
        return {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
