"""Learned routers on sentence features: kNN, per-expert logistic regression, an MLP,
RouteLLM's matrix factorisation, Bench-CoE's subject-level router and ensembles.

Every router predicts each expert's expected score in [0, 1]; fractional table
scores (e.g. 0.4 = right on 40% of samples) are soft targets. sklearn models
are stored as their parameter arrays, torch models as their state dicts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from routers.base import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Bound, Router, RouterConfig, RouterError, register_router
from routers.table import RoutingTable


class _Standardizer:
    def __init__(self, mean: np.ndarray | None = None, scale: np.ndarray | None = None) -> None:
        self.mean, self.scale = mean, scale

    def fit(self, x: np.ndarray) -> "_Standardizer":
        # One scale for all dimensions (the root mean variance): per-dimension scaling
        # would blow up near-constant directions (e.g. the last SVD components).
        self.mean = x.mean(axis=0)
        self.scale = np.full(x.shape[1], max(float(np.sqrt(x.var(axis=0).mean())), 1e-6))
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


def _soft_logreg(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression on soft labels y in [0, 1]: each row appears as a positive
    with weight y and a negative with weight 1 - y. Returns (coef (d,), intercept)."""
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():  # one class only: a constant predictor
        p = float(np.clip(y[0], 1e-4, 1 - 1e-4))
        return np.zeros(x.shape[1]), float(np.log(p / (1 - p)))
    xx = np.concatenate([x, x])
    yy = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    ww = np.concatenate([y, 1.0 - y])
    keep = ww > 0
    clf = LogisticRegression(C=c, max_iter=300, random_state=seed)
    clf.fit(xx[keep], yy[keep], sample_weight=ww[keep])
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


# ------------------------------------------------------------------ kNN
_BLAS: Any = None


def _blas_controller() -> Any:
    """A cached threadpoolctl controller (building one inspects every loaded library)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS


def _similarities(x: np.ndarray, train_x: np.ndarray) -> np.ndarray:
    """``x @ train_x.T``. When torch is loaded (the MiniLM encoder runs in it), the product
    runs in torch's thread pool: numpy's OpenBLAS starts its own worker threads for a
    product this size, and on a small machine they keep spinning after it returns and
    starve the next MiniLM forward of a core (measured: 55 ms forward became 134 ms
    end to end on 2 cores; 55 ms with the product in torch)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or len(x) > 256:
        if len(x) > 16:
            return x @ train_x.T
        # A few queries: one BLAS thread. Multi-threaded OpenBLAS for a product this small
        # costs more in thread wake-ups than it saves (16 ms vs 0.3 ms p50 on a loaded 2-core CPU).
        with _blas_controller().limit(limits=1, user_api="blas"):
            return x @ train_x.T
    with torch.inference_mode():
        dtype = np.result_type(x, train_x)  # torch, unlike numpy, refuses float32 @ float64
        return (torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)) @ torch.from_numpy(np.ascontiguousarray(train_x, dtype=dtype)).T).numpy()


def _principal_basis(x: np.ndarray, r: int) -> np.ndarray:
    """(d, r) orthonormal top-r right singular vectors of ``x`` (uncentred, as cosine
    similarities are), from the eigenvectors of the d x d Gram matrix."""
    x64 = x.astype(np.float64)
    _, vecs = np.linalg.eigh(x64.T @ x64)  # ascending eigenvalues
    return np.ascontiguousarray(vecs[:, ::-1][:, :r]).astype(np.float32)


@dataclasses.dataclass
class KNNRouterConfig(RouterConfig):
    """Mean scores of the k most similar training prompts."""

    bounds: ClassVar[dict[str, Bound]] = {"k": AT_LEAST_1, "temperature": POSITIVE, "project": NON_NEGATIVE, "project_weight": NON_NEGATIVE, "reduce": NON_NEGATIVE}
    k: int = 100
    """Neighbours averaged per query."""
    weighting: str = "uniform"
    """'uniform' or 'softmax' (weights exp(similarity / temperature))."""
    temperature: float = 0.05
    """Softmax temperature over cosine similarities."""
    project: int = 0
    """Supervised directions added to the similarity: this many PLS components of the
    features that covary most with the training prompts' scores (each query's scores
    centred, so the directions separate experts rather than easy from hard prompts).
    0: plain cosine kNN."""
    project_weight: float = 1.0
    """Weight of the projected block against the (unit-norm) similarity features."""
    reduce: int = 0
    """Keep this many principal directions of the training vectors (uncentred SVD) and
    compute similarities in that subspace: each query then costs reduce x (dims +
    training prompts) instead of dims x training prompts. 0: full dimension."""


@register_router("knn")
class KNNRouter(Router):
    """k-nearest-neighbour router (cosine similarity of sentence embeddings), as
    LLMRouter's and RouterBench's kNN baselines."""

    config_cls = KNNRouterConfig
    reference_url = "https://arxiv.org/abs/2403.12031"

    proj_mean: np.ndarray | None = None
    proj_rotation: np.ndarray | None = None
    basis: np.ndarray | None = None

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        assert x is not None
        self.proj_mean = self.proj_rotation = self.basis = None
        if self.config.project:
            self._fit_projection(x, table.scores)
        self.train_x = self._metric(x)
        if 0 < self.config.reduce < self.train_x.shape[1]:
            self.basis = _principal_basis(self.train_x, self.config.reduce)
            self.train_x = self.train_x @ self.basis  # what _metric gives from now on
        self.train_y = table.scores.astype(np.float32)

    def _fit_projection(self, x: np.ndarray, scores: np.ndarray) -> None:
        from sklearn.cross_decomposition import PLSRegression

        centred = scores - scores.mean(axis=1, keepdims=True)
        k = min(self.config.project, x.shape[1], len(x) - 1)
        if k < 1:
            raise RouterError(f"knn: project={self.config.project} needs at least 2 training prompts, found {len(x)}")
        if not np.any(np.abs(centred) > 1e-12):
            raise RouterError(f"knn: project={self.config.project}: every expert scores the same on each of the {len(x)} training prompts, so there is nothing to project on")
        mean = x.astype(np.float64).mean(axis=0)
        # sklearn's default of 500 power iterations left one component unconverged on an
        # LLMRouter fold (3,589 prompts x 1,792 features); 2,000 converged there.
        pls = PLSRegression(n_components=k, scale=False, max_iter=2000).fit(x - mean, centred)
        self.proj_mean = mean.astype(np.float32)
        self.proj_rotation = pls.x_rotations_.astype(np.float32)

    def _metric(self, x: np.ndarray) -> np.ndarray:
        """The vectors whose dot products are the similarities: the features as they are,
        or with a projection, the unit-norm features beside the unit-norm projected
        block times its weight; with ``reduce``, their coordinates in the principal basis."""
        from routers.encoders import normalise_rows

        m = x.astype(np.float32)
        if self.proj_rotation is not None:
            z = normalise_rows((m - self.proj_mean) @ self.proj_rotation) * np.float32(self.config.project_weight)
            m = np.concatenate([normalise_rows(m), z], axis=1) / np.float32(np.sqrt(1.0 + self.config.project_weight**2))
        return m if self.basis is None else m @ self.basis

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        sims = _similarities(self._metric(x), self.train_x)  # (n, N)
        k = min(self.config.k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (n, k)
        s = np.take_along_axis(sims, top, axis=1)
        if self.config.weighting == "uniform":
            w = np.ones_like(s)
        elif self.config.weighting == "softmax":
            w = np.exp((s - s.max(axis=1, keepdims=True)) / self.config.temperature)
        else:
            raise RouterError(f"knn: weighting: expected 'uniform' or 'softmax', found {self.config.weighting!r}")
        w = w / w.sum(axis=1, keepdims=True)
        return np.einsum("nk,nke->ne", w, self.train_y[top])

    def _state(self) -> dict[str, np.ndarray]:
        out = {"train_x": self.train_x, "train_y": self.train_y}
        if self.proj_rotation is not None:
            out |= {"proj_mean": self.proj_mean, "proj_rotation": self.proj_rotation}
        if self.basis is not None:
            out["basis"] = self.basis
        return out

    def _load_state(self, tensors: dict[str, np.ndarray]) -> None:
        self.train_x, self.train_y = tensors["train_x"], tensors["train_y"]
        self.proj_mean, self.proj_rotation = tensors.get("proj_mean"), tensors.get("proj_rotation")
        self.basis = tensors.get("basis")


# -------------------------------------------------------------- logreg
@dataclasses.dataclass
class LogRegRouterConfig(RouterConfig):
    """One calibrated logistic regression per expert on standardised features."""

    bounds: ClassVar[dict[str, Bound]] = {"c": POSITIVE}

    encoder: str = "minilm+tfidf"
    c: float = 0.01
    """Inverse L2 strength (on standardised features)."""


@register_router("logreg")
class LogRegRouter(Router):
    """Per-expert logistic regression: P(expert answers well | prompt), calibrated by
    construction, trained on soft labels."""

    config_cls = LogRegRouterConfig

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        assert x is not None
        self.std = _Standardizer().fit(x)
        z = self.std(x)
        coefs, bias = [], []
        for j in range(len(self.experts)):
            w, b = _soft_logreg(z, table.scores[:, j], self.config.c, self.config.seed)
            coefs.append(w)
            bias.append(b)
        self.coef, self.intercept = np.stack(coefs), np.asarray(bias)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        return _sigmoid(self.std(x) @ self.coef.T + self.intercept)

    def _state(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef, "intercept": self.intercept, "mean": self.std.mean, "scale": self.std.scale}

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.coef, self.intercept = t["coef"], t["intercept"]
        self.std = _Standardizer(t["mean"], t["scale"])


# ------------------------------------------------------- torch models
def _train_torch(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int) -> None:
    """The one training loop for the torch routers: soft-label BCE, AdamW, minibatches."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()


def _torch_predict(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch.sigmoid(model(torch.as_tensor(x, dtype=torch.float32))).numpy().astype(np.float64)


def _state_to_numpy(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _numpy_to_state(model: Any, tensors: dict[str, np.ndarray]) -> None:
    import torch

    model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
    model.eval()


@dataclasses.dataclass
class MLPRouterConfig(RouterConfig):
    """A two-layer perceptron with one output per expert."""

    bounds: ClassVar[dict[str, Bound]] = {"hidden": AT_LEAST_1, "dropout": Bound(0, 1, open_high=True), "epochs": AT_LEAST_1, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": AT_LEAST_1, "min_steps": NON_NEGATIVE}

    encoder: str = "minilm+tfidf"
    hidden: int = 256
    dropout: float = 0.3
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    min_steps: int = 300
    """Train at least this many minibatch steps (more epochs on small tables)."""


def _mlp(d: int, hidden: int, e: int, dropout: float) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Dropout(dropout), torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, e)
    )


@register_router("mlp")
class MLPRouter(Router):
    """MLP on standardised features predicting every expert's score (multi-label BCE)."""

    config_cls = MLPRouterConfig

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        import torch

        assert x is not None
        torch.manual_seed(self.config.seed)
        self.std = _Standardizer().fit(x)
        self.meta["input_dim"] = int(x.shape[1])
        self.net = _mlp(x.shape[1], self.config.hidden, len(self.experts), self.config.dropout)
        c = self.config
        epochs = max(c.epochs, -(-c.min_steps * c.batch_size // max(1, len(x))))
        _train_torch(self.net, self.std(x), table.scores, epochs, c.lr, c.weight_decay, c.batch_size, c.seed)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        return _torch_predict(self.net, self.std(x))

    def _state(self) -> dict[str, np.ndarray]:
        return {**{f"net.{k}": v for k, v in _state_to_numpy(self.net).items()}, "mean": self.std.mean, "scale": self.std.scale}

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.std = _Standardizer(t["mean"], t["scale"])
        self.net = _mlp(int(self.meta["input_dim"]), self.config.hidden, len(self.experts), self.config.dropout)
        _numpy_to_state(self.net, {k[4:]: v for k, v in t.items() if k.startswith("net.")})


@dataclasses.dataclass
class MFRouterConfig(RouterConfig):
    """RouteLLM's matrix factorisation: score(m, q) = w2 . (v_m * (W1 q + b)) + c_m."""

    bounds: ClassVar[dict[str, Bound]] = {"dim": AT_LEAST_1, "epochs": AT_LEAST_1, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": AT_LEAST_1}

    encoder: str = "minilm"
    dim: int = 128
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64


def _mf(d: int, h: int, e: int) -> Any:
    import torch

    class MF(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(d, h)  # W1, b
            self.experts = torch.nn.Embedding(e, h)  # v_m
            self.w2 = torch.nn.Linear(h, 1, bias=False)
            self.bias = torch.nn.Parameter(torch.zeros(e))  # c_m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.proj(x)  # (B, h)
            inter = q[:, None, :] * self.experts.weight[None, :, :]  # (B, E, h)
            return self.w2(inter).squeeze(-1) + self.bias  # (B, E)

    return MF()


@register_router("mf")
class MFRouter(Router):
    """Matrix factorisation of the query x expert score matrix with query factors
    projected from sentence embeddings (RouteLLM's best router, extended to E experts)."""

    config_cls = MFRouterConfig
    reference_url = "https://arxiv.org/abs/2406.18665"

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        import torch

        assert x is not None
        torch.manual_seed(self.config.seed)
        self.meta["input_dim"] = int(x.shape[1])
        self.net = _mf(x.shape[1], self.config.dim, len(self.experts))
        c = self.config
        _train_torch(self.net, x, table.scores, c.epochs, c.lr, c.weight_decay, c.batch_size, c.seed)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        return _torch_predict(self.net, x)

    def _state(self) -> dict[str, np.ndarray]:
        return _state_to_numpy(self.net)

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.net = _mf(int(self.meta["input_dim"]), self.config.dim, len(self.experts))
        _numpy_to_state(self.net, t)


# -------------------------------------------------------------- subject
@dataclasses.dataclass
class SubjectRouterConfig(RouterConfig):
    """Bench-CoE's subject-level router: the best expert per task (predicted from the
    prompt) or per embedding cluster."""

    bounds: ClassVar[dict[str, Bound]] = {"clusters": AT_LEAST_1, "c": POSITIVE, "smoothing": NON_NEGATIVE}
    mode: str = "task"
    """'task': classify the prompt's task, then the task's mean expert scores;
    'cluster': k-means clusters of the embeddings."""
    clusters: int = 16
    c: float = 1.0
    """Inverse L2 strength of the task classifier."""
    smoothing: float = 5.0
    """Pseudo-count shrinking each group's means toward the global means."""


@register_router("subject")
class SubjectRouter(Router):
    """Subject-level routing (Bench-CoE): per-group mean scores, the group predicted from the prompt."""

    config_cls = SubjectRouterConfig
    reference_url = "https://arxiv.org/abs/2412.04167"

    def _group_means(self, groups: np.ndarray, n_groups: int, scores: np.ndarray) -> np.ndarray:
        glob = scores.mean(axis=0)
        out = np.zeros((n_groups, scores.shape[1]))
        for g in range(n_groups):
            m = groups == g
            out[g] = (scores[m].sum(axis=0) + self.config.smoothing * glob) / (m.sum() + self.config.smoothing)
        return out

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        assert x is not None
        if self.config.mode == "task":
            from sklearn.linear_model import LogisticRegression

            names = table.task_names
            self.meta["tasks"] = names
            y = np.array([names.index(t) for t in table.tasks])
            self.group_scores = self._group_means(y, len(names), table.scores)
            if len(names) == 1:
                self.coef, self.intercept = np.zeros((1, x.shape[1])), np.zeros(1)
                return
            clf = LogisticRegression(C=self.config.c, max_iter=500, random_state=self.config.seed).fit(x, y)
            coef, icpt = clf.coef_, clf.intercept_
            if len(names) == 2:  # sklearn gives one row for two classes
                coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
            self.coef, self.intercept = coef, icpt
        elif self.config.mode == "cluster":
            from sklearn.cluster import KMeans

            k = max(1, min(self.config.clusters, len(x)))
            km = KMeans(n_clusters=k, n_init=4, random_state=self.config.seed).fit(x)
            self.centroids = km.cluster_centers_.astype(np.float32)
            self.group_scores = self._group_means(km.labels_, k, table.scores)
        else:
            raise RouterError(f"subject: mode: expected 'task' or 'cluster', found {self.config.mode!r}")

    def group_probabilities(self, x: np.ndarray) -> np.ndarray:
        """(n, groups): P(task | prompt), or a one-hot nearest cluster."""
        if self.config.mode == "task":
            z = x @ self.coef.T + self.intercept
            z = np.exp(z - z.max(axis=1, keepdims=True))
            return z / z.sum(axis=1, keepdims=True)
        d = ((x[:, None, :] - self.centroids[None]) ** 2).sum(-1)  # (n, k)
        return np.eye(len(self.centroids))[d.argmin(axis=1)]

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        return self.group_probabilities(x) @ self.group_scores

    def _state(self) -> dict[str, np.ndarray]:
        if self.config.mode == "task":
            return {"coef": self.coef, "intercept": self.intercept, "group_scores": self.group_scores}
        return {"centroids": self.centroids, "group_scores": self.group_scores}

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.group_scores = t["group_scores"]
        if self.config.mode == "task":
            self.coef, self.intercept = t["coef"], t["intercept"]
        else:
            self.centroids = t["centroids"]


# ------------------------------------------------------------- ensemble
@dataclasses.dataclass
class EnsembleRouterConfig(RouterConfig):
    """A weighted average of member routers' predicted scores."""

    bounds: ClassVar[dict[str, Bound]] = {"weights": NON_NEGATIVE}

    encoder: str = "none"
    members: tuple[str, ...] = ("knn", "subject:mode=cluster:clusters=32", "logreg:encoder=minilm")
    """Member routers as 'key' or 'key:option=value:...' (each trained with this seed)."""
    weights: tuple[float, ...] = ()
    """One weight per member; empty means equal weights."""


@register_router("ensemble")
class EnsembleRouter(Router):
    """Averages the members' calibrated per-expert predictions; members are saved in
    sub-directories ``member<i>/`` beside the ensemble's config.json."""

    config_cls = EnsembleRouterConfig
    uses_encoder = False

    def __init__(self, config: Any = None, members: list[Router] | None = None) -> None:
        super().__init__(config)
        self.members: list[Router] = members or []

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        from routers.base import make_router

        if not self.members:
            specs = [parse_member(k) for k in self.config.members]
            self.members = [make_router(key, **{**opts, "seed": self.config.seed}) for key, opts in specs]
            for m in self.members:
                m.fit(table)
        else:
            self.config.members = tuple(m.key for m in self.members)

    def _weights(self) -> np.ndarray:
        w = np.asarray(self.config.weights or [1.0] * len(self.members), dtype=np.float64)
        if len(w) != len(self.members):
            raise RouterError(f"ensemble: weights: expected {len(self.members)} numbers, found {len(w)}")
        if not w.sum() > 0:
            raise RouterError(f"router 'ensemble': option 'weights': expected at least one weight > 0, found {list(self.config.weights)}")
        return w / w.sum()

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        preds = [m.predict(prompts) for m in self.members]
        return np.einsum("m,mne->ne", self._weights(), np.stack(preds))

    def children(self) -> list[Router]:
        return list(self.members)

    def _save_extra(self, directory: Path) -> None:
        for i, m in enumerate(self.members):
            m.save(directory / f"member{i}")

    def _load_extra(self, directory: Path) -> None:
        self.members = []
        for i, key in enumerate(self.config.members):
            m = Router.load(directory / f"member{i}")
            if m.experts != self.experts:
                raise RouterError(f"{directory}/member{i}: experts {m.experts} differ from the ensemble's {self.experts}")
            self.members.append(m)

    def hyperparameters(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self.config)
        hp["members"] = list(hp["members"])
        hp["weights"] = list(hp["weights"])
        return hp


def parse_member(spec: str) -> tuple[str, dict[str, Any]]:
    """'knn:k=50:encoder=tfidf' -> ('knn', {'k': 50, 'encoder': 'tfidf'}); values parsed as JSON when they can be."""
    key, *opts = spec.split(":")
    out: dict[str, Any] = {}
    for o in opts:
        if "=" not in o:
            raise RouterError(f"ensemble member '{spec}': expected key:option=value, found '{o}'")
        k, v = o.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return key, out


def members_config(directory: str | Path) -> list[dict[str, Any]]:
    """The member configs of a saved ensemble (for display)."""
    d = Path(directory)
    return [json.loads((p / "config.json").read_text()) for p in sorted(d.glob("member*"))]


# ------------------------------------------------------------ partition
@dataclasses.dataclass
class PartitionRouterConfig(RouterConfig):
    """An average over many k-means partitions of the prompt space of each cell's
    (smoothed) mean expert scores; the partition sizes, the smoothing and the feature
    view are chosen on a validation split carved from the training table."""

    bounds: ClassVar[dict[str, Bound]] = {
        "clusters": AT_LEAST_1,
        "repeats": AT_LEAST_1,
        "smoothing": NON_NEGATIVE,
        "validation": Bound(0, 1, open_low=True, open_high=True),
        "grid_clusters": AT_LEAST_1,
        "grid_smoothing": NON_NEGATIVE,
    }
    encoder: str = "minilm+tfidf"
    clusters: tuple[int, ...] = (16, 24, 32)
    """Numbers of clusters; ``repeats`` k-means runs (different seeds) for each."""
    repeats: int = 8
    smoothing: float = 5.0
    """Pseudo-count shrinking each cell's means toward the training means."""
    view: str = "all"
    """'all' encoder features, or 'first': the first encoder's block only (MiniLM of minilm+tfidf)."""
    select: bool = True
    """Choose ``clusters``, ``smoothing`` and ``view`` from ``grid_*`` on a validation split of
    the training table (stratified by task), then refit on the whole training table."""
    validation: float = 0.2
    grid_clusters: tuple[tuple[int, ...], ...] = ((16,), (24,), (32,), (16, 24, 32))
    grid_smoothing: tuple[float, ...] = (2.0, 5.0, 15.0)
    grid_view: tuple[str, ...] = ("all", "first")


def _sq_distances(x: np.ndarray, centroids: np.ndarray, sq_norms: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances from each row of x to each centroid, up to each row's
    own squared norm (which does not change the nearest centroid). ``sq_norms``: the
    centroids' squared norms, if already known."""
    c2 = (centroids * centroids).sum(1) if sq_norms is None else sq_norms
    return c2[None, :] - 2.0 * _similarities(x.astype(np.float32), centroids)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row of x."""
    return _sq_distances(x, centroids).argmin(axis=1)


@register_router("partition")
class PartitionRouter(Router):
    """Bench-CoE's cluster-level routing made smoother: each of many k-means partitions
    (several k, several seeds) predicts a prompt's expert scores as the mean over its
    cell, and the router averages them, which works like an adaptive-bandwidth kernel
    smoother over the embedding space. On LLMRouter this beat kNN, one k-means, per-expert
    logistic regression, random forests and stacked meta-models (docs/benchmarks.md)."""

    config_cls = PartitionRouterConfig
    reference_url = "https://arxiv.org/abs/2412.04167"

    def _view(self, x: np.ndarray, view: str) -> np.ndarray:
        if view == "all":
            return x
        if view == "first":
            return x[:, : int(self.meta.get("first_dim", x.shape[1]))]
        raise RouterError(f"partition: view: expected 'all' or 'first', found {view!r}")

    def _partitions(self, x: np.ndarray, ks: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(labels, centroids) for each of ``repeats`` k-means runs per k."""
        from sklearn.cluster import KMeans

        out = []
        for k in ks:
            k = max(1, min(int(k), len(x)))
            for r in range(self.config.repeats):
                km = KMeans(n_clusters=k, n_init=1, random_state=seed * 1000 + r * 31 + k).fit(x)
                out.append((km.labels_, km.cluster_centers_.astype(np.float32)))
        return out

    @staticmethod
    def _cell_means(labels: np.ndarray, k: int, scores: np.ndarray, smoothing: float) -> np.ndarray:
        glob = scores.mean(axis=0)
        sums = np.zeros((k, scores.shape[1]))
        np.add.at(sums, labels, scores)
        counts = np.bincount(labels, minlength=k)[:, None]
        return (sums + smoothing * glob) / (counts + smoothing)

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        assert x is not None
        enc = self.encoder
        parts = getattr(enc, "parts", None)
        self.meta["first_dim"] = int(parts[0].encode(table.prompts[:1]).shape[1]) if parts else int(x.shape[1])
        c = self.config
        if c.select and len(table) >= 50:
            self._select(x, table)
        xv = self._view(x, c.view)
        cents, cells, offsets = [], [], [0]
        for labels, centroids in self._partitions(xv, tuple(c.clusters), c.seed):
            cents.append(centroids)
            cells.append(self._cell_means(labels, len(centroids), table.scores, c.smoothing))
            offsets.append(offsets[-1] + len(centroids))
        self.centroids = np.concatenate(cents).astype(np.float32)
        self._c2 = (self.centroids * self.centroids).sum(1)
        self.cell_scores = np.concatenate(cells)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def _select(self, x: np.ndarray, table: RoutingTable) -> None:
        """Grid search on a validation split of the training table (never the test set)."""
        from routers.table import split_indices

        c = self.config
        fit_i, val_i = split_indices(table.tasks, c.validation, c.seed + 7919)
        fit_i, val_i = np.asarray(fit_i), np.asarray(val_i)
        y_fit, y_val = table.scores[fit_i], table.scores[val_i]
        all_k = sorted({int(k) for ks in c.grid_clusters for k in ks})
        results = []
        for view in c.grid_view:
            xv = self._view(x, view)
            # One set of partitions per k, reused by every (clusters, smoothing) combination.
            per_k = {k: [(lab, _nearest(xv[val_i], cen)) for lab, cen in self._partitions(xv[fit_i], (k,), c.seed)] for k in all_k}
            for smoothing in c.grid_smoothing:
                preds_k = {k: [self._cell_means(lab, min(k, len(fit_i)), y_fit, smoothing)[near] for lab, near in per_k[k]] for k in all_k}
                for ks in c.grid_clusters:
                    p = np.mean([q for k in ks for q in preds_k[k]], axis=0)
                    score = float(y_val[np.arange(len(val_i)), p.argmax(1)].mean())
                    results.append((score, view, tuple(int(k) for k in ks), float(smoothing)))
        results.sort(key=lambda r: -r[0])
        best = results[0]
        c.view, c.clusters, c.smoothing = best[1], best[2], best[3]
        self.meta["validation"] = {"queries": int(len(val_i)), "best_single": float(y_val.mean(0).max()), "oracle": float(y_val.max(1).mean()), "chosen_score": best[0], "grid": [{"score": s, "view": v, "clusters": list(k), "smoothing": sm} for s, v, k, sm in results]}

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        xv = self._view(x, self.config.view)
        out = np.zeros((len(xv), self.cell_scores.shape[1]))
        n = len(self.offsets) - 1
        # One product against every partition's centroids, then the nearest cell per partition.
        d = _sq_distances(xv, self.centroids, self._c2)
        for i in range(n):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            out += self.cell_scores[a:b][d[:, a:b].argmin(axis=1)]
        return out / max(n, 1)

    def hyperparameters(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self.config)
        for k in ("clusters", "grid_smoothing", "grid_view"):
            hp[k] = list(hp[k])
        hp["grid_clusters"] = [list(g) for g in hp["grid_clusters"]]
        return hp

    def _state(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "cell_scores": self.cell_scores, "offsets": self.offsets}

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        self.centroids, self.cell_scores, self.offsets = t["centroids"], t["cell_scores"], t["offsets"].astype(np.int64)
        self._c2 = (self.centroids * self.centroids).sum(1)
        c = self.config
        c.clusters = tuple(int(k) for k in c.clusters)
        c.grid_clusters = tuple(tuple(int(k) for k in g) for g in c.grid_clusters)
        c.grid_smoothing, c.grid_view = tuple(c.grid_smoothing), tuple(c.grid_view)
