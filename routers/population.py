"""Population router (L2D-Pop): a router that takes a new expert from a few demonstrations.

Learning to defer to a population (Tailor et al. 2024, https://arxiv.org/abs/2403.02683)
describes each expert by an embedding pooled from a *context set* of demonstrations
(query, was the expert right) and trains one deferral model conditioned on that embedding,
so an expert it never saw is routed to with no weight change. Ramgolam, Carneiro and Chen
(2025, "Learning To Defer To A Population With Limited Demonstrations",
https://arxiv.org/abs/2510.19351) make the context sets small (tens of demonstrations)
and stretch them with pseudo-labels from a semi-supervised correctness model.

Here, for LLM routing:

- features: the frozen encoder's query embedding x (MiniLM by default);
- expert embedding: each context item (x_i, y_i) becomes phi(h(x_i), y_i); the embedding is
  their mean (``pooling=mean``) or, per target query, a sum weighted by attention over the
  context items most similar to it (``pooling=attention``, the default; see ``_net``). Both
  ignore the order of the context; an empty context gives the zero embedding, and then the
  model predicts the population-agnostic P(an expert is right | x);
- score: P(expert right | x, its embedding), one sigmoid per expert (one-vs-all), which is
  each expert's predicted score for the policies (best, cost, budget, cascade) exactly as
  for every other router. A trained expert's context is its whole training column;
- meta-training: each episode draws an expert, a context of U(10, 50) of its (query, score)
  rows (empty in ``empty_share`` of episodes) and target queries of other prompts (never
  one of the context's), and minimises the BCE of the targets' scores; the step with the
  lowest loss on held-out prompts is kept. Half the episodes' experts are synthetic, made
  from the table's (``synthetic_scores``): with eight or nine real experts, a deferral
  model meta-trained on those alone learns them and not how to read a new one;
- pseudo-labels (``add_expert(pseudo_labels=K)``): label spreading from the demonstrations
  over the training queries labels the K it is surest of, which join the context.

The trained weights are ``router.safetensors``; every expert's context lives beside them
in ``contexts.safetensors`` (the context queries' embeddings and the scores) and
``contexts.json`` (names, sizes, sources). ``routers.demonstrations.add_expert`` (``collab
route add-expert``) appends a new expert's context and rewrites only those files and config.json: the
weights file keeps its bytes. The episodes, synthetic experts and pseudo-labels live in
routers/population_episodes.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from routers.base import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Bound,
    Router,
    RouterConfig,
    RouterError,
    register_router,
)
from routers.population_episodes import (
    Episode,
    context_size,
    distinct_prompt_rows,
    episode_batch,
    prompt_clusters,
    pseudo_label,
    sample_episode,
    synthetic_scores,
)
from routers.table import RoutingTable

CONTEXTS_JSON = "contexts.json"
CONTEXTS_TENSORS = "contexts.safetensors"
POOLINGS = ("mean", "attention")


@dataclasses.dataclass
class PopulationRouterConfig(RouterConfig):
    """A deferral model conditioned on an expert embedding pooled from a context set."""

    bounds: ClassVar[dict[str, Bound]] = {
        "hidden": AT_LEAST_1,
        "embed": AT_LEAST_1,
        "heads": AT_LEAST_1,
        "neighbours": AT_LEAST_1,
        "dropout": Bound(0, 1, open_high=True),
        "context_min": NON_NEGATIVE,
        "context_max": AT_LEAST_1,
        "targets": AT_LEAST_1,
        "episodes": AT_LEAST_1,
        "steps": AT_LEAST_1,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "empty_share": UNIT,
        "synthetic_share": UNIT,
        "synthetic_clusters": AT_LEAST_1,
        "validation": Bound(0, 1, open_high=True),
        "eval_every": AT_LEAST_1,
        "known_context": NON_NEGATIVE,
        "pseudo_labels": NON_NEGATIVE,
        "pseudo_k": AT_LEAST_1,
    }

    encoder: str = "minilm"
    pooling: str = "attention"
    """'mean' (one embedding per expert) or 'attention' (per target query, a weighted sum of the context items)."""
    hidden: int = 128
    """Width of the hidden layers."""
    embed: int = 64
    """Size of the query and expert embeddings."""
    heads: int = 4
    """Attention heads (``pooling=attention``); must divide ``embed``."""
    neighbours: int = 100
    """Attention reads at most this many context items per query, the most similar ones
    (``pooling=attention``): a trained expert's whole training column is read like a kNN."""
    dropout: float = 0.3
    context_min: int = 10
    """Smallest context of a meta-training episode."""
    context_max: int = 50
    """Largest context of a meta-training episode."""
    targets: int = 32
    """Target queries per episode."""
    episodes: int = 32
    """Episodes per optimiser step."""
    steps: int = 800
    """Optimiser steps of meta-training (the best on the held-out queries is kept)."""
    lr: float = 1e-3
    weight_decay: float = 1e-2
    empty_share: float = 0.1
    """Share of episodes with an empty context: trains the population-agnostic prediction."""
    synthetic_share: float = 0.5
    """Share of episodes whose expert is synthetic (``synthetic_scores``): half of them two
    experts of the table joined over the query clusters, half an expert with a random skill
    on some clusters, so that meta-training sees more kinds of expert than the table has
    (a new expert is one more kind)."""
    synthetic_clusters: int = 8
    """k-means clusters of the training queries: the regions over which synthetic experts differ from real ones."""
    validation: float = 0.1
    """Share of the training table's prompts held out as targets to choose the step (0: keep the last)."""
    eval_every: int = 100
    """Steps between two validation losses."""
    known_context: int = 0
    """Rows of the training table stored as each trained expert's context (0: all of them)."""
    pseudo_labels: int = 0
    """``add_expert`` default: unlabelled training queries pseudo-labelled for a new expert (0: none)."""
    pseudo_k: int = 10
    """Neighbours of the label-spreading graph that makes the pseudo-labels."""


def _net(d: int, c: PopulationRouterConfig) -> Any:
    import torch
    from torch import nn

    class PopulationNet(nn.Module):
        """logit P(right | x, context) = a(x) + g(h(x), e), with g(h, 0) = 0.

        h(x): the query's embedding; a(x): the population-agnostic logit (one linear map of
        h); e: the expert embedding pooled from the context items phi(h(x_i), s_i), where
        s_i = 2 y_i - 1 (+1 right, -1 wrong). ``mean`` pooling: e = [mean phi_i, mean s_i].
        ``attention``: per head, weights softmax_i(tau_head * cos(x, x_i)) over the context's
        ``neighbours`` items most similar to x (tau learned per head, from a flat to a sharper
        kernel), e = [sum w phi_i, sum w s_i,
        log(1 + sum_i exp(tau (cos_i - 1)))], the last being how many close neighbours the
        context has (how far its local evidence is to be trusted). An empty context gives
        e = 0, and g has no bias terms, so the empty context's prediction is exactly a(x)."""

        def __init__(self) -> None:
            super().__init__()
            m = c.embed
            self.query = nn.Sequential(
                nn.Dropout(c.dropout),
                nn.Linear(d, c.hidden),
                nn.GELU(),
                nn.Dropout(c.dropout),
                nn.Linear(c.hidden, m),
            )
            self.agnostic = nn.Linear(m, 1)
            self.item = nn.Sequential(
                nn.Linear(2 * m + 1, c.hidden), nn.GELU(), nn.Linear(c.hidden, m)
            )
            extra = 2 * c.heads if c.pooling == "attention" else 1
            if c.pooling == "attention":
                self.log_tau = nn.Parameter(
                    torch.linspace(0.0, math.log(16.0), c.heads)
                    if c.heads > 1
                    else torch.tensor([math.log(4.0)])
                )
            self.head = nn.Sequential(
                nn.Linear(2 * m + extra, c.hidden, bias=False),
                nn.GELU(),
                nn.Linear(c.hidden, 1, bias=False),
            )

        def items(self, hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
            s = (2.0 * yc - 1.0).unsqueeze(-1)  # (..., C, 1)
            return torch.cat(
                [self.item(torch.cat([hc, hc * s, s], dim=-1)), s], dim=-1
            )  # (..., C, m + 1)

        def pool(
            self,
            hq: torch.Tensor,
            vc: torch.Tensor,
            mask: torch.Tensor,
            cos: torch.Tensor | None,
        ) -> torch.Tensor:
            """Expert embedding for each target: hq (B, T, m), vc (B, C, m + 1), mask (B, C),
            cos (B, T, C) -> (B, T, m + extra). Sums over the context only, so the order of
            its items does not matter; an empty context gives zeros."""
            b, t, m = hq.shape
            if c.pooling == "mean":
                w = mask.to(vc.dtype)  # (B, C)
                e = (vc * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(
                    min=1.0
                )  # (B, m + 1)
                return e.unsqueeze(1).expand(b, t, m + 1)
            assert cos is not None
            nh, n_ctx = c.heads, vc.shape[1]
            keep = mask[:, None, :].expand(b, t, n_ctx)  # (B, T, C)
            if (
                n_ctx > c.neighbours
            ):  # only the nearest context items: kNN-like on a whole training column
                masked = cos.masked_fill(~keep, -2.0)
                keep = keep & (
                    masked >= masked.topk(c.neighbours, dim=-1).values[..., -1:]
                )
            w = keep.to(vc.dtype).unsqueeze(1)  # (B, 1, T, C)
            tau = self.log_tau.exp()[None, :, None, None]  # (1, H, 1, 1)
            logits = tau * cos.unsqueeze(1)  # (B, H, T, C)
            att = logits.masked_fill(w == 0, -1e9).softmax(-1) * w  # empty -> all 0
            phi = (
                vc[..., :m].reshape(b, n_ctx, nh, m // nh).transpose(1, 2)
            )  # (B, H, C, m/H)
            e_phi = (att @ phi).transpose(1, 2).reshape(b, t, m)  # (B, T, m)
            e_s = (
                (att * vc[..., m][:, None, None, :]).sum(-1).transpose(1, 2)
            )  # (B, T, H)
            near = (torch.exp(tau * (cos.unsqueeze(1) - 1.0)) * w).sum(-1)  # (B, H, T)
            return torch.cat([e_phi, e_s, torch.log1p(near).transpose(1, 2)], dim=-1)

        def score(self, hq: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            m = hq.shape[-1]
            g = self.head(torch.cat([hq * e[..., :m], e], dim=-1)).squeeze(
                -1
            )  # (B, T); 0 where e = 0
            return self.agnostic(hq).squeeze(-1) + g  # logits (B, T)

        def forward(
            self,
            xq: torch.Tensor,
            xc: torch.Tensor,
            yc: torch.Tensor,
            mask: torch.Tensor,
        ) -> torch.Tensor:
            hq, hc = self.query(xq), self.query(xc)
            cos = cosine(xq, xc) if c.pooling == "attention" else None
            return self.score(hq, self.pool(hq, self.items(hc, yc), mask, cos))

    return PopulationNet()


def cosine(a: Any, b: Any) -> Any:
    """(..., T, C) cosine similarities of the rows of a (..., T, d) and b (..., C, d) (torch)."""
    import torch

    na = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    nb = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.matmul(na, nb.transpose(-1, -2))


# ------------------------------------------------------------------ router
@register_router("population")
class PopulationRouter(Router):
    """L2D-Pop: one deferral model for a population of experts, each described by an
    embedding of its context set; ``add_context`` (``collab route add-expert``) adds an
    expert from a few demonstrations without changing a weight."""

    config_cls = PopulationRouterConfig
    reference_url = "https://arxiv.org/abs/2510.19351"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.net: Any = None
        self.ctx_x = np.zeros((0, 0), dtype=np.float32)
        """(M, d) embeddings of every context query: the training table's, then added demonstrations'."""
        self.ctx_rows: list[np.ndarray] = []
        """Per expert (in ``experts`` order): the rows of ``ctx_x`` in its context."""
        self.ctx_y: list[np.ndarray] = []
        """Per expert: its score on each of those rows."""
        self.ctx_info: list[dict[str, Any]] = []
        self.pool_rows = 0
        """The first ``pool_rows`` rows of ``ctx_x`` are the training table's queries (the pseudo-label pool)."""
        self._cache: dict[int, Any] = {}

    # ------------------------------------------------------------ training
    def _check(self) -> None:
        c = self.config
        if c.pooling not in POOLINGS:
            raise RouterError(
                f"population: pooling: expected 'mean' or 'attention', found {c.pooling!r}"
            )
        if c.embed % c.heads:
            raise RouterError(
                f"router 'population': option 'heads': expected a divisor of embed={c.embed}, found {c.heads}"
            )
        if c.context_min > c.context_max:
            raise RouterError(
                f"router 'population': option 'context_min': expected at most context_max={c.context_max}, found {c.context_min}"
            )

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        assert x is not None
        self._check()
        c = self.config
        self.meta["input_dim"] = int(x.shape[1])
        self.meta["meta_training"] = self._meta_train(x.astype(np.float32), table)
        rng = np.random.default_rng(c.seed + 1)
        self.ctx_x = np.ascontiguousarray(x, dtype=np.float32)
        self.pool_rows = len(x)
        self.ctx_rows, self.ctx_y, self.ctx_info = [], [], []
        for j, e in enumerate(self.experts):
            rows = np.arange(len(x), dtype=np.int64)
            if 0 < c.known_context < len(x):
                rows = np.sort(rng.choice(rows, size=c.known_context, replace=False))
            self.ctx_rows.append(rows)
            self.ctx_y.append(table.scores[rows, j].astype(np.float32))
            self.ctx_info.append(
                {"name": e, "source": "training table", "rows": len(rows)}
            )
        self._cache.clear()

    def _meta_train(self, x: np.ndarray, table: RoutingTable) -> dict[str, Any]:
        """Episodic training of ``self.net``; returns what the meta records about it."""
        import torch

        c = self.config
        torch.manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        self.net = _net(x.shape[1], c)
        reps = distinct_prompt_rows(table.prompts)
        reps = reps[rng.permutation(len(reps))]
        n_val = (
            int(np.rint(c.validation * len(reps)))
            if c.validation > 0 and len(reps) >= 20
            else 0
        )
        val, train = np.sort(reps[:n_val]), np.sort(reps[n_val:])
        if len(train) < 2:
            raise RouterError(
                f"population: needs at least 2 distinct training prompts, found {len(train)}"
            )
        xt = torch.from_numpy(x)
        n_exp = len(self.experts)

        clusters = prompt_clusters(x, c)
        y_np = np.asarray(table.scores, dtype=np.float32)

        def episode(
            pool: np.ndarray,
            target_pool: np.ndarray | None,
            expert: int,
            n_targets: int,
            synthetic: bool,
        ) -> Episode:
            size = context_size(
                rng, c, len(pool) if target_pool is None else len(pool) + 1
            )
            ctx, tgt = sample_episode(rng, pool, size, n_targets, target_pool)
            kind = ("mix" if rng.random() < 0.5 else "skill") if synthetic else "real"
            score = synthetic_scores(rng, y_np, clusters, expert, kind)
            return Episode(
                ctx, tgt, score(ctx).astype(np.float32), score(tgt).astype(np.float32)
            )

        val_batches = []
        if n_val:
            val_eps = [
                episode(train, val, j, 256, False)
                for j in range(n_exp)
                for _ in range(8)
            ]
            val_batches = [
                episode_batch(xt, val_eps[i : i + 32]) for i in range(0, len(val_eps), 32)
            ]
        opt = torch.optim.AdamW(
            self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay
        )
        bce = torch.nn.functional.binary_cross_entropy_with_logits

        def loss_sum(b: tuple[Any, ...]) -> tuple[Any, Any]:
            xq, xc, yc, cm, y, tm = b
            logits = self.net(xq, xc, yc, cm)
            return (bce(logits, y, reduction="none") * tm).sum(), tm.sum()

        def mean_loss(batches: list[tuple[Any, ...]]) -> Any:
            parts = [loss_sum(b) for b in batches]
            return sum(p[0] for p in parts) / max(float(sum(p[1] for p in parts)), 1.0)

        best = (float("inf"), 0, None)
        history, run = [], 0.0
        for step in range(1, c.steps + 1):
            self.net.train()
            eps = [
                episode(
                    train,
                    None,
                    int(rng.integers(n_exp)),
                    c.targets,
                    rng.random() < c.synthetic_share,
                )
                for _ in range(c.episodes)
            ]
            opt.zero_grad()
            loss = mean_loss([episode_batch(xt, eps)])
            loss.backward()
            opt.step()
            run += float(loss.detach())
            if step % c.eval_every == 0 or step == c.steps:
                self.net.eval()
                with torch.inference_mode():
                    vl = (
                        float(mean_loss(val_batches))
                        if val_batches
                        else run / c.eval_every
                    )
                history.append(
                    {
                        "step": step,
                        "train_loss": round(run / c.eval_every, 5),
                        "val_loss": round(vl, 5),
                    }
                )
                run = 0.0
                if not val_batches or vl < best[0]:
                    best = (
                        vl,
                        step,
                        {
                            k: v.detach().clone()
                            for k, v in self.net.state_dict().items()
                        },
                    )
        if best[2] is not None:
            self.net.load_state_dict(best[2])
        self.net.eval()
        return {
            "episodes": c.steps * c.episodes,
            "best_step": best[1],
            "best_val_loss": best[0] if val_batches else None,
            "validation_prompts": int(n_val),
            "history": history,
        }

    # ------------------------------------------------------------ inference
    def _encoded(self, j: int) -> tuple[Any, Any, Any]:
        """Expert ``j``'s context as tensors (x_i (C, d), h(x_i) (C, m), phi_i (C, m + 1)), computed once."""
        if j not in self._cache:
            self._cache[j] = self._context_tensors(
                self.ctx_x[self.ctx_rows[j]], self.ctx_y[j]
            )
        return self._cache[j]

    def _context_tensors(
        self, context_x: np.ndarray, context_y: np.ndarray
    ) -> tuple[Any, Any, Any]:
        import torch

        y = np.asarray(context_y, dtype=np.float32)
        xc = torch.from_numpy(
            np.ascontiguousarray(context_x, dtype=np.float32).reshape(
                len(y), int(self.meta["input_dim"])
            )
        )
        with torch.inference_mode():
            hc = self.net.query(xc)  # (C, m)
            return (
                xc,
                hc,
                self.net.items(hc, torch.from_numpy(y)),
            )  # (C, d), (C, m), (C, m + 1)

    def _scores(
        self, x: np.ndarray, xc: Any, hc: Any, vc: Any, chunk: int = 256
    ) -> np.ndarray:
        """P(right) for queries x given one context's tensors (``_context_tensors``)."""
        import torch

        out = []
        mask = torch.ones((1, len(hc)), dtype=torch.bool)
        with torch.inference_mode():
            for a in range(0, len(x), chunk):
                xq = torch.as_tensor(x[a : a + chunk], dtype=torch.float32)  # (n, d)
                hq = self.net.query(xq).unsqueeze(0)  # (1, n, m)
                cos = (
                    cosine(xq, xc).unsqueeze(0)
                    if self.config.pooling == "attention"
                    else None
                )  # (1, n, C)
                e = self.net.pool(hq, vc.unsqueeze(0), mask, cos)
                out.append(torch.sigmoid(self.net.score(hq, e))[0].numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        assert x is not None
        x = np.asarray(x, dtype=np.float32)
        return np.stack(
            [self._scores(x, *self._encoded(j)) for j in range(len(self.experts))],
            axis=1,
        ).reshape(len(x), len(self.experts))

    def embedding(
        self,
        context_x: np.ndarray,
        context_y: np.ndarray,
        query_x: np.ndarray | None = None,
    ) -> np.ndarray:
        """The expert embedding of a context set: one vector for mean pooling; for attention,
        one row per query of ``query_x``. An empty context gives zeros."""
        import torch

        xc, hc, vc = self._context_tensors(context_x, context_y)
        xq = torch.from_numpy(
            np.zeros((1, int(self.meta["input_dim"])), dtype=np.float32)
            if query_x is None
            else np.asarray(query_x, dtype=np.float32)
        )
        with torch.inference_mode():
            hq = self.net.query(xq).unsqueeze(0)  # (1, n, m)
            e = self.net.pool(
                hq,
                vc.unsqueeze(0),
                torch.ones((1, len(hc)), dtype=torch.bool),
                cosine(xq, xc).unsqueeze(0),
            )[0]  # (n, m + extra)
        return e[0].numpy() if self.config.pooling == "mean" else e.numpy()

    def context_scores(
        self, x: np.ndarray, context_x: np.ndarray, context_y: np.ndarray
    ) -> np.ndarray:
        """(n,) P(right | query, embedding of this context) for an expert known only by its context."""
        return self._scores(
            np.asarray(x, dtype=np.float32),
            *self._context_tensors(context_x, context_y),
        )

    def agnostic(self, x: np.ndarray) -> np.ndarray:
        """(n,) the population-agnostic prediction: P(right | query) under the empty context."""
        return self.context_scores(
            x,
            np.zeros((0, int(self.meta["input_dim"])), dtype=np.float32),
            np.zeros(0, dtype=np.float32),
        )

    # ------------------------------------------------------------ new experts
    def add_context(
        self,
        name: str,
        x: np.ndarray,
        y: np.ndarray,
        info: dict[str, Any] | None = None,
        pool: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Add expert ``name`` described by demonstrations (their query embeddings ``x`` (N, d)
        and scores ``y`` (N,)) and, optionally, pseudo-labelled pool rows ``(rows, labels)``.
        Changes no parameter of the network."""
        if self.net is None:
            raise RouterError("population: not fitted (call fit or load)")
        if name in self.experts:
            raise RouterError(
                f"expert '{name}' is already one of the router's experts ({', '.join(self.experts)}); choose another name"
            )
        x = np.asarray(x, dtype=np.float32).reshape(
            len(y), self.ctx_x.shape[1] if not len(y) else -1
        )
        if x.shape[1] != self.ctx_x.shape[1]:
            raise RouterError(
                f"population: demonstrations have {x.shape[1]} features, the router's encoder gives {self.ctx_x.shape[1]}"
            )
        start = len(self.ctx_x)
        self.ctx_x = np.concatenate([self.ctx_x, x]).astype(np.float32)
        rows, ys = (
            np.arange(start, start + len(x), dtype=np.int64),
            np.asarray(y, dtype=np.float32),
        )
        if pool is not None and len(pool[0]):
            rows, ys = (
                np.concatenate([rows, np.asarray(pool[0], dtype=np.int64)]),
                np.concatenate([ys, np.asarray(pool[1], dtype=np.float32)]),
            )
        self.experts.append(name)
        self.ctx_rows.append(rows)
        self.ctx_y.append(ys)
        self.ctx_info.append({"name": name, "rows": len(rows), **(info or {})})

    def pseudo_pool(
        self, x_demo: np.ndarray, y_demo: np.ndarray, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-labelled rows of the training-query pool for a new expert (``pseudo_label``),
        leaving out pool queries that are one of the demonstrations (cosine >= 0.9999)."""
        from routers.encoders import normalise_rows

        pool = self.ctx_x[: self.pool_rows]
        keep = np.arange(len(pool))
        if len(x_demo) and len(pool):
            keep = keep[
                (normalise_rows(pool) @ normalise_rows(x_demo).T).max(axis=1) < 0.9999
            ]
        rows, labels = pseudo_label(
            x_demo, y_demo, pool[keep], count, self.config.pseudo_k
        )
        return keep[rows], labels

    # ------------------------------------------------------------ artefacts
    def _state(self) -> dict[str, np.ndarray]:
        return {
            f"net.{k}": v.detach().cpu().numpy()
            for k, v in self.net.state_dict().items()
        }

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        import torch

        self._check()
        self.net = _net(int(self.meta["input_dim"]), self.config)
        self.net.load_state_dict(
            {k[4:]: torch.as_tensor(v) for k, v in t.items() if k.startswith("net.")}
        )
        self.net.eval()

    def _save_extra(self, directory: Path) -> None:
        self.save_contexts(directory)

    def save_contexts(self, directory: Path) -> None:
        """Write ``contexts.safetensors`` and ``contexts.json`` (every expert's context) into ``directory``."""
        from safetensors.numpy import save_file

        from collab.io import atomic_write_json

        tensors = {"x": np.ascontiguousarray(self.ctx_x, dtype=np.float32)}
        for i, (rows, ys) in enumerate(zip(self.ctx_rows, self.ctx_y)):
            tensors[f"rows.{i}"] = np.ascontiguousarray(rows, dtype=np.int64)
            tensors[f"y.{i}"] = np.ascontiguousarray(ys, dtype=np.float32)
        save_file(tensors, str(directory / CONTEXTS_TENSORS))
        atomic_write_json(
            directory / CONTEXTS_JSON,
            {"version": 1, "pool_rows": int(self.pool_rows), "experts": self.ctx_info},
        )

    def _load_extra(self, directory: Path) -> None:
        from safetensors.numpy import load_file

        cj, ct = directory / CONTEXTS_JSON, directory / CONTEXTS_TENSORS
        if not cj.is_file() or not ct.is_file():
            raise RouterError(
                f"{directory}: a population router needs {CONTEXTS_JSON} and {CONTEXTS_TENSORS}, found {'neither' if not cj.exists() and not ct.exists() else 'only one'}"
            )
        info = json.loads(cj.read_text(encoding="utf-8"))
        names = [e.get("name") for e in info.get("experts", [])]
        if names != self.experts:
            raise RouterError(
                f"{cj}: experts {names} differ from config.json's {self.experts}"
            )
        t = load_file(str(ct))
        self.ctx_x = t["x"]
        self.ctx_rows = [t[f"rows.{i}"].astype(np.int64) for i in range(len(names))]
        self.ctx_y = [t[f"y.{i}"].astype(np.float32) for i in range(len(names))]
        self.ctx_info = list(info["experts"])
        self.pool_rows = int(info.get("pool_rows", 0))
        self._cache.clear()

