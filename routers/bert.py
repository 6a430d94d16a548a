"""The ``bert`` router: MiniLM fine-tuned end to end as a multi-label classifier
(one logit per expert), as RouteLLM's BERT router and LLMRouter's RouterDC do
with larger encoders. Only the top ``train_layers`` transformer layers and the
head are trained, so the artefact holds only those (the frozen rest is the zoo's
MiniLM)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from routers.base import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Bound, Router, RouterConfig, RouterError, register_router
from routers.table import RoutingTable


@dataclasses.dataclass
class BertRouterConfig(RouterConfig):
    """Fine-tune the top layers of a BERT-style sentence encoder with a linear head."""

    bounds: ClassVar[dict[str, Bound]] = {"train_layers": NON_NEGATIVE, "epochs": AT_LEAST_1, "lr": POSITIVE, "head_lr": POSITIVE, "batch_size": AT_LEAST_1, "max_length": AT_LEAST_1}

    encoder: str = "none"
    base: str = "zoo:minilm-l6"
    """The encoder to fine-tune: zoo:minilm-l6 or a local BERT directory."""
    train_layers: int = 2
    """How many of the top transformer layers are trained (the rest stay frozen)."""
    epochs: int = 2
    lr: float = 5e-5
    head_lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 128


def _base_path(ref: str) -> str:
    if ref.startswith("zoo:"):
        from collab import zoo

        return str(zoo.get(ref[4:]).path())
    return ref


@register_router("bert")
class BertRouter(Router):
    """MiniLM + mean pooling + linear head, fine-tuned on soft per-expert scores."""

    config_cls = BertRouterConfig
    uses_encoder = False
    reference_url = "https://arxiv.org/abs/2406.18665"
    _device = "cpu"

    def _build(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = _base_path(self.config.base)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.head = torch.nn.Linear(self.model.config.hidden_size, len(self.experts))
        n_layers = self.model.config.num_hidden_layers
        k = max(0, min(self.config.train_layers, n_layers))
        self._trained_prefixes = tuple(f"encoder.layer.{i}." for i in range(n_layers - k, n_layers))
        for name, p in self.model.named_parameters():
            p.requires_grad = name.startswith(self._trained_prefixes)
        self.model.to(self._device)
        self.head.to(self._device)

    def to(self, device: str) -> "BertRouter":
        """Fine-tune and predict on ``device`` (call before ``fit`` to train there)."""
        from routers.encoders import check_device

        self._device = check_device(device)
        if getattr(self, "model", None) is not None:
            self.model.to(self._device)
            self.head.to(self._device)
        return self

    def _logits(self, prompts: list[str]) -> Any:
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt").to(self._device)
        out = self.model(**enc).last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)  # (B, T, 1)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return self.head(pooled)  # (B, E)

    def _fit(self, x: np.ndarray | None, table: RoutingTable) -> None:
        import torch

        torch.manual_seed(self.config.seed)
        self._build()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": params, "lr": self.config.lr}, {"params": self.head.parameters(), "lr": self.config.head_lr}], weight_decay=0.01)
        y = torch.as_tensor(table.scores, dtype=torch.float32, device=self._device)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        g = torch.Generator().manual_seed(self.config.seed)
        self.model.train()
        for _ in range(self.config.epochs):
            perm = torch.randperm(len(table), generator=g).tolist()
            for start in range(0, len(perm), self.config.batch_size):
                idx = perm[start : start + self.config.batch_size]
                opt.zero_grad()
                loss = loss_fn(self._logits([table.prompts[i] for i in idx]), y[idx])
                loss.backward()
                opt.step()
        self.model.eval()

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(prompts), 64):
                out.append(torch.sigmoid(self._logits(prompts[start : start + 64])).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def _state(self) -> dict[str, np.ndarray]:
        st = {f"model.{k}": v.detach().cpu().numpy() for k, v in self.model.state_dict().items() if k.startswith(self._trained_prefixes)}
        st.update({f"head.{k}": v.detach().cpu().numpy() for k, v in self.head.state_dict().items()})
        return st

    def _load_state(self, t: dict[str, np.ndarray]) -> None:
        import torch

        self._build()
        model_sd = {k[len("model."):]: torch.as_tensor(v) for k, v in t.items() if k.startswith("model.")}
        missing = [k for k in model_sd if k not in self.model.state_dict()]
        if missing:
            raise RouterError(f"bert router: weight '{missing[0]}' does not belong to base {self.config.base}")
        self.model.load_state_dict(model_sd, strict=False)
        self.head.load_state_dict({k[len("head."):]: torch.as_tensor(v) for k, v in t.items() if k.startswith("head.")})
        self.model.eval()
