"""Text encoders for routers: the offline MiniLM sentence encoder, TF-IDF, and a causal
LM's pooled hidden states (``lm``).

Sentence embeddings are cached on disk by content hash under
``collab.io.cache_root()/embeddings/<encoder-id>/``: each call that computes new
vectors appends one safetensors shard holding the texts' SHA-256 digests and
their vectors, so any later subset of the same texts (another split, another
seed) costs a dictionary lookup. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from collab.errors import CollabError


class Encoder(Protocol):
    """Turns texts into a dense float32 matrix (n, dim)."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def config(self) -> dict[str, Any]: ...


#: sklearn's default token pattern (words of two or more word characters).
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Content-addressed store of vectors for one encoder, in safetensors shards."""

    def __init__(self, encoder_id: str, root: Path | None = None) -> None:
        from collab.io import cache_root

        self.dir = (root or cache_root() / "embeddings") / encoder_id
        self._table: dict[bytes, np.ndarray] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self.max_memory = 500_000

    def _refresh(self) -> None:
        from safetensors.numpy import load_file

        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("*.safetensors")):
            if shard.name in self._loaded:
                continue
            try:
                data = load_file(str(shard))
            except Exception:  # noqa: BLE001 - a corrupt shard is skipped, its vectors recomputed
                continue
            keys, vecs = data["keys"], data["vectors"]
            for k, v in zip(keys, vecs):
                self._table[k.tobytes()] = v
            self._loaded.add(shard.name)

    def get(self, texts: Sequence[str]) -> tuple[list[np.ndarray | None], list[bytes]]:
        digests = [_digest(t) for t in texts]
        with self._lock:
            if any(d not in self._table for d in digests):
                self._refresh()
            return [self._table.get(d) for d in digests], digests

    def put(self, digests: Sequence[bytes], vectors: np.ndarray, persist: bool = True) -> None:
        """Remember vectors; write them to a new shard only if ``persist`` (bulk encodes),
        so that routing single requests never writes files."""
        from safetensors.numpy import save_file

        if not digests:
            return
        if not persist:
            with self._lock:
                if len(self._table) > self.max_memory:
                    self._table.clear()
                    self._loaded.clear()
                for d, v in zip(digests, vectors):
                    self._table[d] = v
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32)
        name = hashlib.sha256(keys.tobytes()).hexdigest()[:24] + ".safetensors"
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        save_file({"keys": np.ascontiguousarray(keys), "vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, str(tmp))
        os.replace(tmp, self.dir / name)
        with self._lock:
            for d, v in zip(digests, vectors):
                self._table[d] = v
            self._loaded.add(name)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cached_encode(cache: EmbeddingCache | None, texts: Sequence[str], compute: Any, dim: int, persist_min: int = 16) -> np.ndarray:
    """``compute(texts)`` for the texts ``cache`` lacks (each distinct text once), the
    rest from the cache: (n, dim) float32. Batches under ``persist_min`` new texts stay
    in memory, so routing single requests never writes files."""
    texts = list(texts)
    if cache is None:
        return np.asarray(compute(texts), dtype=np.float32).reshape(len(texts), -1)
    found, digests = cache.get(texts)
    missing = [i for i, v in enumerate(found) if v is None]
    if missing:
        # Unique texts only: tables repeat prompts across tasks.
        uniq: dict[bytes, int] = {}
        for i in missing:
            uniq.setdefault(digests[i], i)
        order = list(uniq.values())
        vecs = np.asarray(compute([texts[i] for i in order]), dtype=np.float32)
        cache.put([digests[i] for i in order], vecs, persist=len(order) >= persist_min)
        by_digest = {digests[i]: v for i, v in zip(order, vecs)}
        for i in missing:
            found[i] = by_digest[digests[i]]
    if not found:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(found).astype(np.float32, copy=False)


class MiniLMEncoder:
    """Mean-pooled, L2-normalised MiniLM-L6 sentence embeddings (384-d), offline.

    ``model`` is a sentence-transformers directory or ``zoo:minilm-l6``. Vectors
    are cached by content hash, so re-encoding a table costs a lookup."""

    name = "minilm"

    def __init__(self, model: str = "zoo:minilm-l6", batch_size: int = 64, max_seq_length: int = 256, cache: bool = True, device: str = "cpu") -> None:
        self.model_ref = model
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.device = check_device(device)
        self._model: Any = None
        self._cache = EmbeddingCache(f"minilm-l6-{max_seq_length}" if model == "zoo:minilm-l6" else hashlib.sha256(model.encode()).hexdigest()[:16]) if cache else None
        self.dim = 384
        self.persist_min = 16  # batches smaller than this stay in memory only

    def _path(self) -> Path:
        if self.model_ref.startswith("zoo:"):
            from collab import zoo

            return zoo.get(self.model_ref[4:]).path()
        p = Path(self.model_ref)
        if not p.is_dir():
            raise CollabError(f"encoder: sentence-transformers directory '{self.model_ref}' not found")
        return p

    @property
    def model(self) -> Any:
        """The loaded SentenceTransformer (loaded on first use, CPU, offline)."""
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self._path()), device=self.device)
            self._model.max_seq_length = self.max_seq_length
            self.dim = int(self._model.get_embedding_dimension() or 384)
        return self._model

    def to(self, device: str) -> "MiniLMEncoder":
        """Run the forward pass on ``device`` ('cpu', 'cuda', 'cuda:1', 'mps' or 'auto').
        Vectors stay float32 NumPy arrays and share the same cache."""
        self.device = check_device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def encode_uncached(self, texts: Sequence[str]) -> np.ndarray:
        """The raw sentence-transformers forward pass, no cache: (n, 384) float32."""
        import torch

        with torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 embeddings, from the cache where possible."""
        return cached_encode(self._cache, texts, self.encode_uncached, self.dim, self.persist_min)

    def config(self) -> dict[str, Any]:
        return {"type": "minilm", "model": self.model_ref, "max_seq_length": self.max_seq_length}


_LM_EXPERTS: dict[tuple[str, str], Any] = {}


class LMEncoder:
    """Mean-pooled hidden states of a causal LM at chosen layers (default: the zoo's
    SmolLM2-135M at layers 7 and 30), each layer's block centred on the training
    prompts' mean and L2-normalised. On LLMRouter, MiniLM plus these blocks gave kNN
    22.6% of the gap against 17.0% for MiniLM alone (docs/benchmarks.md). The raw pooled
    vectors are cached by content hash; the centre is fitted and saved with the router."""

    name = "lm"

    def __init__(self, model: str = "zoo:smollm2-135m-instruct", layers: Sequence[int] = (7, 30), max_tokens: int = 256, batch_size: int = 16, cache: bool = True, device: str = "cpu") -> None:
        self.model_ref = model
        self.layers = tuple(int(x) for x in layers)
        if not self.layers:
            raise CollabError("lm encoder: layers: expected at least one layer number")
        self.max_tokens = int(max_tokens)
        self.batch_size = batch_size
        self.device = check_device(device)
        self.center: np.ndarray | None = None
        self.dim = 0
        self._expert: Any = None
        key = hashlib.sha256(f"{model}|{self.layers}|{self.max_tokens}".encode()).hexdigest()[:16]
        self._cache = EmbeddingCache(f"lm-{key}") if cache else None

    @property
    def expert(self) -> Any:
        """The collab Expert whose hidden states are pooled (loaded on first use)."""
        if self._expert is None:
            key = (self.model_ref, self.device)
            if key not in _LM_EXPERTS:  # routers and their refits share one loaded model
                from collab.experts import Expert

                _LM_EXPERTS[key] = Expert.load(self.model_ref, device=self.device)
            self._expert = _LM_EXPERTS[key]
        return self._expert

    def to(self, device: str) -> "LMEncoder":
        device = check_device(device)
        if device != self.device:
            self.device, self._expert = device, None  # the shared model for that device loads on next use
        return self

    def encode_uncached(self, texts: Sequence[str]) -> np.ndarray:
        """Raw pooled hidden states (n, layers x hidden), neither centred nor normalised."""
        return self.expert.embed(texts, self.layers, self.max_tokens, self.batch_size)

    def _raw(self, texts: Sequence[str]) -> np.ndarray:
        return cached_encode(self._cache, texts, self.encode_uncached, self.dim)

    def fit(self, texts: Sequence[str]) -> "LMEncoder":
        raw = self._raw(texts)
        self.center = raw.mean(axis=0).astype(np.float32)
        self.dim = raw.shape[1]
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.center is None:
            raise CollabError("lm encoder: not fitted (call fit on the training prompts first)")
        z = self._raw(texts) - self.center
        if not len(z):
            return z
        blocks = np.split(z, len(self.layers), axis=1)
        return np.concatenate([normalise_rows(b) for b in blocks], axis=1)

    def config(self) -> dict[str, Any]:
        return {"type": "lm", "model": self.model_ref, "layers": list(self.layers), "max_tokens": self.max_tokens}

    def state(self) -> dict[str, np.ndarray]:
        assert self.center is not None
        return {"lm.center": self.center}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> "LMEncoder":
        enc = cls(config.get("model", "zoo:smollm2-135m-instruct"), config.get("layers", (7, 30)), int(config.get("max_tokens", 256)))
        if "lm.center" not in tensors:
            raise CollabError("lm encoder: the router's safetensors lacks 'encoder.lm.center'")
        enc.center = tensors["lm.center"].astype(np.float32)
        enc.dim = len(enc.center)
        if enc.dim % len(enc.layers):
            raise CollabError(f"lm encoder: centre of {enc.dim} numbers does not split into {len(enc.layers)} layers")
        return enc


def check_device(device: str) -> str:
    """A torch device string that this machine has; 'auto' picks CUDA when present, else the CPU."""
    from collab.devices import check_device as check

    return check(device, "encoder: device")


class TfidfEncoder:
    """TF-IDF over word 1-2-grams, L2-normalised, reduced to ``dim`` dimensions with SVD
    (LSA) so that every router sees a dense matrix. Fitted on the training prompts;
    its vocabulary, idf and projection are plain arrays, saved as safetensors."""

    name = "tfidf"

    def __init__(self, dim: int = 256, max_features: int = 20000, seed: int = 0) -> None:
        self.dim = dim
        self.max_features = max_features
        self.seed = seed
        self.vocab: dict[str, int] = {}
        self.idf: np.ndarray | None = None
        self.components: np.ndarray | None = None  # (dim, vocab)
        self._vectorizer: Any = None
        self._rows: np.ndarray | None = None  # components.T, built on first direct encode

    def fit(self, texts: Sequence[str]) -> "TfidfEncoder":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(ngram_range=(1, 2), max_features=self.max_features, sublinear_tf=True, min_df=2, dtype=np.float32)
        x = vec.fit_transform(list(texts))
        self.vocab = {str(k): int(v) for k, v in vec.vocabulary_.items()}
        self.idf = vec.idf_.astype(np.float32)
        k = max(1, min(self.dim, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=k, random_state=self.seed)
        svd.fit(x)
        self.components = svd.components_.astype(np.float32)
        self.dim = k
        self._vectorizer = vec
        return self

    def _vec(self) -> Any:
        if self._vectorizer is None:
            if self.idf is None:
                raise CollabError("tfidf encoder: not fitted (call fit on the training prompts first)")
            from sklearn.feature_extraction.text import TfidfVectorizer

            vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=self.vocab, dtype=np.float32)
            vec.fit(["x"])  # builds the analyzer; idf is replaced below
            vec.idf_ = self.idf
            self._vectorizer = vec
        return self._vectorizer

    #: Below this many texts, ``encode`` skips sklearn's vectoriser (whose per-call
    #: validation and sparse-matrix plumbing cost ~1 ms) and computes the same
    #: TF-IDF-SVD vector directly: regex tokens, 1-2-grams, 1 + log(tf) x idf, L2
    #: norm, then a sum of the projection's rows for the terms present.
    direct_max = 16

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.components is None or self.idf is None:
            raise CollabError("tfidf encoder: not fitted (call fit on the training prompts first)")
        texts = list(texts)
        if len(texts) <= self.direct_max:
            z = np.stack([self._encode_one(t) for t in texts]) if texts else np.zeros((0, self.dim), dtype=np.float32)
        else:
            x = self._vec().transform(texts)  # sparse (n, vocab)
            z = np.asarray(x @ self.components.T, dtype=np.float32)  # (n, dim)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.maximum(norms, 1e-8)

    def _encode_one(self, text: str) -> np.ndarray:
        """One text's (dim,) un-normalised projection, equal to sklearn's path (tested)."""
        if self._rows is None:
            self._rows = np.ascontiguousarray(self.components.T)  # (vocab, dim): one row per term
        tokens = _TOKEN.findall(text.lower())
        counts: dict[int, int] = {}
        vocab = self.vocab
        for gram in itertools.chain(tokens, map(" ".join, zip(tokens, tokens[1:]))):
            j = vocab.get(gram)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        if not counts:
            return np.zeros(self.dim, dtype=np.float32)
        idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        w = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float32, count=len(counts)))) * self.idf[idx]
        w /= max(float(np.sqrt(w @ w)), 1e-12)
        return w.astype(np.float32) @ self._rows[idx]

    def config(self) -> dict[str, Any]:
        return {"type": "tfidf", "dim": self.dim, "max_features": self.max_features}

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to save: the vocabulary as sorted term ids, idf and the SVD projection."""
        assert self.idf is not None and self.components is not None
        terms = sorted(self.vocab, key=self.vocab.get)
        blob = "\n".join(terms).encode("utf-8")
        return {"tfidf.terms": np.frombuffer(blob, dtype=np.uint8).copy(), "tfidf.idf": self.idf, "tfidf.components": self.components}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> "TfidfEncoder":
        enc = cls(dim=int(config["dim"]), max_features=int(config.get("max_features", 20000)))
        terms = tensors["tfidf.terms"].tobytes().decode("utf-8").split("\n")
        enc.vocab = {t: i for i, t in enumerate(terms)}
        enc.idf = tensors["tfidf.idf"]
        enc.components = tensors["tfidf.components"]
        return enc


class ConcatEncoder:
    """Several encoders side by side (e.g. MiniLM + TF-IDF), each block L2-normalised."""

    name = "concat"

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)

    def fit(self, texts: Sequence[str]) -> "ConcatEncoder":
        for p in self.parts:
            if hasattr(p, "fit"):
                p.fit(texts)
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.concatenate([p.encode(texts) for p in self.parts], axis=1)

    def to(self, device: str) -> "ConcatEncoder":
        for p in self.parts:
            if hasattr(p, "to"):
                p.to(device)
        return self

    def config(self) -> dict[str, Any]:
        return {"type": "concat", "parts": [p.config() for p in self.parts]}


_MINILM: dict[tuple[str, int], MiniLMEncoder] = {}


def minilm(model: str = "zoo:minilm-l6", max_seq_length: int = 256) -> MiniLMEncoder:
    """A shared MiniLMEncoder per model, so several routers load the model once."""
    key = (model, max_seq_length)
    if key not in _MINILM:
        _MINILM[key] = MiniLMEncoder(model, max_seq_length=max_seq_length)
    return _MINILM[key]


_ENCODER_NAMES = "'minilm', 'tfidf', 'lm', 'lm@LAYERS' or 'lm=MODEL@LAYERS' (a causal LM's pooled hidden states, e.g. lm@7,30), or several joined by '+' (e.g. 'minilm+lm')"


def _named_encoder(part: str) -> Any:
    if part == "minilm":
        return minilm()
    if part == "tfidf":
        return TfidfEncoder()
    if part == "lm" or part.startswith(("lm=", "lm@")):
        ref, _, layers = part[3:].partition("@") if part.startswith("lm=") else ("", "", part[3:])
        try:
            nums = tuple(int(x) for x in layers.split(",")) if layers else (7, 30)
        except ValueError:
            raise CollabError(f"encoder: {part!r}: layers after '@' must be numbers joined by ',' (e.g. lm@7,30)") from None
        return LMEncoder(ref or "zoo:smollm2-135m-instruct", nums)
    raise CollabError(f"encoder: expected {_ENCODER_NAMES}, found {part!r}")


def make_encoder(spec: str | dict[str, Any]) -> Any:
    """An unfitted encoder from a name (``minilm``, ``tfidf``, ``lm``, ``minilm+tfidf``, ...) or a saved config."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split("+") if p.strip()]
        if not parts:
            raise CollabError(f"encoder: expected {_ENCODER_NAMES}, found {spec!r}")
        encs = [_named_encoder(p) for p in parts]
        return encs[0] if len(encs) == 1 else ConcatEncoder(encs)
    kind = spec.get("type")
    if kind == "minilm":
        return minilm(spec.get("model", "zoo:minilm-l6"), int(spec.get("max_seq_length", 256)))
    if kind == "tfidf":
        return TfidfEncoder(dim=int(spec["dim"]), max_features=int(spec.get("max_features", 20000)))
    if kind == "lm":
        return LMEncoder(spec.get("model", "zoo:smollm2-135m-instruct"), spec.get("layers", (7, 30)), int(spec.get("max_tokens", 256)))
    if kind == "concat":
        return ConcatEncoder([make_encoder(p) for p in spec["parts"]])
    raise CollabError(f"encoder config: unknown type {kind!r} (expected minilm, tfidf, lm or concat)")


def encoder_state(enc: Any) -> dict[str, np.ndarray]:
    """The fitted arrays of an encoder (its TF-IDF and lm parts), for saving beside a router."""
    if isinstance(enc, (TfidfEncoder, LMEncoder)):
        return enc.state()
    if isinstance(enc, ConcatEncoder):
        out: dict[str, np.ndarray] = {}
        for i, p in enumerate(enc.parts):
            out.update({f"enc{i}.{k}": v for k, v in encoder_state(p).items()})
        return out
    return {}


def load_encoder(config: dict[str, Any], tensors: dict[str, np.ndarray], prefix: str = "") -> Any:
    """Rebuild a fitted encoder from its saved config and arrays."""
    kind = config.get("type")
    if kind in ("tfidf", "lm"):
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return (TfidfEncoder if kind == "tfidf" else LMEncoder).from_state(config, sub)
    if kind == "concat":
        return ConcatEncoder([load_encoder(p, tensors, f"{prefix}enc{i}.") for i, p in enumerate(config["parts"])])
    return make_encoder(config)
