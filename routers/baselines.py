"""Reference routers for evaluation: the best single expert, random choice and the oracle."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from routers.base import Router, RouterConfig, RouterError, register_router
from routers.table import RoutingTable


@dataclasses.dataclass
class BestSingleRouterConfig(RouterConfig):
    """No options: always the expert with the best mean training score."""

    encoder: str = "none"


@register_router("best-single")
class BestSingleRouter(Router):
    """Predicts every expert's mean training score for every prompt, so the
    best-quality policy always picks the best single expert."""

    config_cls = BestSingleRouterConfig
    uses_encoder = False

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        self.means = table.scores.mean(axis=0)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        return np.tile(self.means, (len(prompts), 1))

    def _state(self) -> dict[str, np.ndarray]:
        return {"means": self.means.astype(np.float64)}

    def _load_state(self, tensors: dict[str, np.ndarray]) -> None:
        self.means = tensors["means"]


@dataclasses.dataclass
class RandomRouterConfig(RouterConfig):
    """Uniform random scores, reproducible per prompt and seed."""

    encoder: str = "none"


@register_router("random")
class RandomRouter(Router):
    """Random predicted scores; the same prompt always gets the same draw (for a seed)."""

    config_cls = RandomRouterConfig
    uses_encoder = False

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        pass

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        out = np.empty((len(prompts), len(self.experts)))
        for i, p in enumerate(prompts):
            h = int.from_bytes(hashlib.sha256(f"{self.config.seed}\0{p}".encode()).digest()[:8], "little")
            out[i] = np.random.default_rng(h).random(len(self.experts))
        return out


@dataclasses.dataclass
class OracleRouterConfig(RouterConfig):
    """Looks the true scores up: an upper bound, only for prompts of the table it was fitted on."""

    encoder: str = "none"


@register_router("oracle")
class OracleRouter(Router):
    """The per-query oracle: ``fit`` memorises the table; ``predict`` returns the true
    scores of known prompts and raises for unseen ones."""

    config_cls = OracleRouterConfig
    uses_encoder = False

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        self._index = {p: i for i, p in enumerate(table.prompts)}
        self._scores = table.scores.copy()
        self._prompts = list(table.prompts)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        rows = []
        for p in prompts:
            if p not in self._index:
                raise RouterError(f"oracle router: prompt not in the table it was fitted on: {p[:60]!r}")
            rows.append(self._scores[self._index[p]])
        return np.stack(rows)

    def _state(self) -> dict[str, np.ndarray]:
        blob = "\0".join(self._prompts).encode("utf-8")
        return {"scores": self._scores, "prompts": np.frombuffer(blob, dtype=np.uint8).copy()}

    def _load_state(self, tensors: dict[str, np.ndarray]) -> None:
        self._scores = tensors["scores"]
        self._prompts = tensors["prompts"].tobytes().decode("utf-8").split("\0")
        self._index = {p: i for i, p in enumerate(self._prompts)}


def constant_router(experts: Sequence[str], scores: Sequence[float]) -> BestSingleRouter:
    """A router that predicts fixed ``scores`` for every prompt (e.g. 'always expert A')."""
    r = BestSingleRouter()
    if len(experts) != len(scores):
        raise RouterError(f"constant router: {len(experts)} experts but {len(scores)} scores")
    r.experts = list(experts)
    r.means = np.asarray(scores, dtype=np.float64)
    r.train_hash = "constant"
    return r
