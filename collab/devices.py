"""Which torch device a user's ``device:`` setting names, checked against this
machine before anything is loaded onto it. Imports torch only for non-CPU values."""

from __future__ import annotations

from collab.errors import CollabError

DEVICE_CHOICES = "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"


def check_device(device: str | None, what: str) -> str:
    """A torch device string that this machine has; 'auto' picks CUDA when present,
    else the CPU. ``what`` names the setting in errors (e.g. ``"expert 'smol': device"``)."""
    d = str(device or "cpu").strip()
    if d == "cpu":
        return d  # without importing torch
    import torch

    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(d)
    except RuntimeError as e:
        raise CollabError(f"{what}: expected {DEVICE_CHOICES}, found {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CollabError(f"{what} {d!r}: this torch build sees no CUDA device (use 'cpu' or 'auto')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CollabError(f"{what} {d!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CollabError(f"{what} {d!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise CollabError(f"{what}: expected {DEVICE_CHOICES}, found {device!r}")
    return d
