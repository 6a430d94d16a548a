"""Small file helpers shared by every package: the cache directory, atomic
writes and content hashes. Nothing here imports torch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

#: The files of a model directory that make up its tokenizer and chat template,
#: copied beside weights written from it (merges, fused and fine-tuned models).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
)


def cache_root() -> Path:
    """Where collab caches de-quantised weights and embeddings (``$COLLAB_CACHE``,
    else ``~/.cache/collab``)."""
    root = os.environ.get("COLLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "collab")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's files are private; outputs should read like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it into place only if
    the block finishes. An interrupted write leaves no partial ``target``."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (choose another output or allow overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        # mkdtemp makes a private (0700) directory; the output should read like any other
        os.chmod(tmp, 0o755)
        for p in tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def jsonl_rows(
    path: str | os.PathLike[str], error: Callable[[str], Exception], where: Callable[[int], str] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file, read lazily. A line
    that is not JSON raises ``error`` with a message that starts with ``where(n)`` (default
    ``FILE:N``), so every reader of a user's JSONL names the bad line the same way."""
    at = where or (lambda n: f"{path}:{n}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{at(n)}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield n, value


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def silence_library_progress() -> None:
    """Turn off the progress bars that transformers and huggingface_hub draw on
    their own (``Loading weights``, shard writing), for commands run with ``-q``."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # transformers' GGUF de-quantisation draws a plain tqdm bar, which only this reaches
    os.environ.setdefault("TQDM_DISABLE", "1")
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
