"""The mixture's router: an MLP over a frozen sentence embedding of the query.

The paper encodes the prompt with a frozen DeBERTaV3; offline, collab uses the
zoo's MiniLM-L6 sentence encoder (``{"type": "minilm"}``, 384-d). A hashed
character n-gram encoder (``{"type": "ngram"}``) needs no model at all: it is
the light choice for tiny experiments and tests. Neither encoder trains.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from collab.errors import CollabError


class QueryEncoder(Protocol):
    """A frozen text encoder: (n, dim) float32 vectors."""

    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


class MiniLMQueryEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a sentence-transformers
    model (``zoo:minilm-l6`` by default), loaded offline on first use."""

    def __init__(self, model: str = "zoo:minilm-l6", max_seq_length: int = 256) -> None:
        self.model_ref = model
        self.max_seq_length = max_seq_length
        self.dim = 384
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            import os
            from pathlib import Path

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:  # pragma: no cover - installed with the zoo extra
                raise CollabError("the MiniLM query encoder needs sentence-transformers (pip install sentence-transformers)") from e
            if self.model_ref.startswith("zoo:"):
                from collab import zoo

                path = zoo.get(self.model_ref[4:]).path()
            else:
                path = Path(self.model_ref)
                if not path.is_dir():
                    raise CollabError(f"encoder: sentence-transformers directory '{self.model_ref}' not found")
            self._model = SentenceTransformer(str(path), device="cpu")
            self._model.max_seq_length = self.max_seq_length
            self.dim = int(self._model.get_embedding_dimension() or 384)
        return self._model

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        model = self._load()
        with torch.inference_mode():
            out = model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
        return out.detach().float().cpu().clone().reshape(len(texts), -1)

    def config(self) -> dict[str, Any]:
        return {"type": "minilm", "model": self.model_ref, "max_seq_length": self.max_seq_length}


class NgramQueryEncoder:
    """Hashed character 3-gram counts (CRC32 buckets), L2-normalised: deterministic,
    instant, no model. Weaker than MiniLM; for tiny experiments and tests."""

    def __init__(self, dim: int = 256) -> None:
        if dim < 8:
            raise CollabError(f"encoder: ngram dim: expected an integer >= 8, found {dim!r}")
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            s = f"  {t.lower()} "
            for j in range(len(s) - 2):
                out[i, zlib.crc32(s[j : j + 3].encode("utf-8")) % self.dim] += 1.0
            norm = math.sqrt(float((out[i] ** 2).sum())) or 1.0
            out[i] /= norm
        return out

    def config(self) -> dict[str, Any]:
        return {"type": "ngram", "dim": self.dim}


ENCODERS = ("minilm", "ngram")


def make_encoder(spec: str | dict[str, Any]) -> QueryEncoder:
    """An encoder from its name (``minilm``, ``ngram``) or the config a checkpoint saved."""
    cfg = {"type": spec} if isinstance(spec, str) else dict(spec)
    kind = cfg.get("type")
    if kind == "minilm":
        return MiniLMQueryEncoder(str(cfg.get("model", "zoo:minilm-l6")), int(cfg.get("max_seq_length", 256)))
    if kind == "ngram":
        return NgramQueryEncoder(int(cfg.get("dim", 256)))
    raise CollabError(f"encoder: expected one of {', '.join(ENCODERS)}, found {kind!r}")


class LatentRouter(nn.Module):
    """Scores s = MLP(z) over the M experts from a query embedding z; the top-K
    scores are the active experts, the best of them the primary."""

    def __init__(self, dim: int, n_experts: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_experts))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, M) scores."""
        return self.net(z.float())


def select(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the indices of the top-``k`` scores, best first (the primary first)."""
    if not 1 <= k <= scores.shape[-1]:
        raise CollabError(f"top_k: expected 1 <= K <= {scores.shape[-1]} (the number of experts), found {k!r}")
    return scores.detach().topk(k, dim=-1).indices.tolist()
