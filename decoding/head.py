"""Co-LLM's deferral head, its losses and its weak labels.

Shen et al., "Learning to Decode Collaboratively with Multiple Language Models"
(2024), https://arxiv.org/abs/2403.03870 (code: clinicalml/co-llm). A latent
variable Z_t says who writes token t: the base model (Z_t = 0) or assistant j
(Z_t = j, 1 <= j <= k). The head reads the base model's last hidden state h_t
(the final-norm output the LM head reads) and gives

    P(Z_t = 0) ∝ 1,   P(Z_t = j) ∝ exp(w_j · h_t)

a (k+1)-way softmax whose base logit is fixed at 0. For one assistant this is
the paper's head exactly: P(Z_t = 1) = sigmoid(w · h_t), the ``<|defer|>`` row
beside the LM head read through a sigmoid (no bias, as the reference's extra
LM-head row has none). Training maximises the marginal likelihood of the
training tokens, sum_j P(Z_t = j) P_j(x_t | x_<t), with no labels for Z; it
starts from weak labels (Z_t = assistant where the assistant's top-1 token is
the gold token and the base's is not).

Nothing here loads models; the functions take tensors and are pinned by
direct-computation tests.
"""

from __future__ import annotations

import torch
from torch import nn

reference_url = "https://arxiv.org/abs/2403.03870"


class DeferralHead(nn.Module):
    """k deferral vectors over the base's final hidden state (float32 whatever the base's dtype)."""

    def __init__(self, hidden_size: int, n_assistants: int) -> None:
        super().__init__()
        if n_assistants < 1:
            raise ValueError(f"DeferralHead: n_assistants: expected >= 1, found {n_assistants}")
        self.hidden_size = int(hidden_size)
        self.n_assistants = int(n_assistants)
        self.weight = nn.Parameter(torch.zeros(self.n_assistants, self.hidden_size))  # (k, H)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., k): each assistant's logit w_j · h against the base's fixed 0."""
        return hidden.float() @ self.weight.T

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., k+1): log P(Z = j), column 0 the base."""
        return z_log_probs(self.scores(hidden))

    def init_from_output_embeddings(self, lm_head_weight: torch.Tensor) -> None:
        """Every row starts as the mean output embedding, as the reference initialises
        its ``<|defer|>`` row before the weak-supervision stage."""
        with torch.no_grad():
            self.weight.copy_(lm_head_weight.float().mean(dim=0, keepdim=True).expand_as(self.weight))


def z_log_probs(scores: torch.Tensor) -> torch.Tensor:
    """(..., k) assistant logits -> (..., k+1) log P(Z = j), with the base's logit fixed at 0.
    For k = 1: [logsigmoid(-s), logsigmoid(s)]."""
    zeros = torch.zeros_like(scores[..., :1])
    return torch.log_softmax(torch.cat([zeros, scores], dim=-1), dim=-1)


def deferral_probability(log_pz: torch.Tensor) -> torch.Tensor:
    """(..., k+1) -> (...): g_t = P(Z_t != base) = 1 - P(Z_t = 0)."""
    return -torch.expm1(log_pz[..., 0])


def marginal_nll(log_pz: torch.Tensor, token_log_probs: torch.Tensor) -> torch.Tensor:
    """The Co-LLM training loss: mean over tokens of -log sum_j P(Z_t = j) P_j(x_t).

    ``log_pz`` (N, k+1) from the head; ``token_log_probs`` (N, k+1): log P_j of
    each gold token, column 0 the base, column j assistant j. For k = 1 this is
    the reference's ``-logsumexp([logsigmoid(-d) + log P_base, logsigmoid(d) +
    log P_asst]).mean()``."""
    return -torch.logsumexp(log_pz + token_log_probs, dim=-1).mean()


def gold_log_probs(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """(N, V) logits, (N,) gold ids -> (N,) log-softmax of each gold token (float32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, gold[:, None])[:, 0]


def top1_hits(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """(N, V), (N,) -> (N,) bool: the gold token is a most likely token (ties count, as the
    reference's ``isclose(log p(gold), max log p)`` does)."""
    return logits.gather(-1, gold[:, None])[:, 0] >= logits.max(dim=-1).values


def weak_labels(base_hits: torch.Tensor, assistant_hits: torch.Tensor, assistant_log_probs: torch.Tensor) -> torch.Tensor:
    """Pseudo-labels for the initialisation stage: (N,) long in 0..k.

    Z_t = 0 where the base's top-1 token is the gold one or no assistant's is; else
    the assistant whose top-1 is gold, the one giving gold the highest probability
    when several are. ``base_hits`` (N,) bool, ``assistant_hits`` (N, k) bool,
    ``assistant_log_probs`` (N, k). For k = 1 this is the reference's init method
    "a": ``is_top1_assistant > is_top1_base``."""
    masked = assistant_log_probs.float().masked_fill(~assistant_hits, float("-inf"))
    best = masked.argmax(dim=-1) + 1  # (N,)
    defer = assistant_hits.any(dim=-1) & ~base_hits
    return torch.where(defer, best, torch.zeros_like(best))


def weighted_init_loss(log_pz: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Weak-supervision loss: mean over tokens of -w_y log P(Z = y), w = ``pos_weight``
    for an assistant label and 1 for the base. For k = 1 this equals
    ``BCEWithLogitsLoss(pos_weight=pos_weight)`` on the deferral logit (the mean
    is over tokens, not over weights, as there)."""
    nll = -log_pz.gather(-1, labels[:, None])[:, 0]
    weights = torch.where(labels > 0, torch.full_like(nll, float(pos_weight)), torch.ones_like(nll))
    return (weights * nll).mean()


def choose_writers(log_pz: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, k+1) -> (B,) long: 0 where the base writes, else 1 + the assistant.

    An assistant writes when g_t = 1 - P(Z_t = 0) > ``threshold`` (the paper's
    rule), and then the one with the largest P(Z_t = j) does. ``threshold`` <= 0
    always defers and >= 1 never does, also where g_t rounds to exactly 0 or 1."""
    g = deferral_probability(log_pz)
    if threshold <= 0:
        defer = torch.ones_like(g, dtype=torch.bool)
    elif threshold >= 1:
        defer = torch.zeros_like(g, dtype=torch.bool)
    else:
        defer = g > threshold
    best = log_pz[..., 1:].argmax(dim=-1) + 1
    return torch.where(defer, best, torch.zeros_like(best))
