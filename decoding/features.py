"""What the frozen models say about each answer token of the training data.

``score_data`` runs the base and every assistant once over the training
conversations (inference mode, right-padded batches) and keeps, per answer
token: the base's final hidden state where the token is predicted (the tensor
the LM head reads, which the deferral head reads too), each model's
log-probability of the gold token, and whether it is that model's top-1. The
training stages of ``decoding.train`` read these instead of re-running the
frozen models, as the reference stores the assistant's log-probabilities once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

    from collab.experts import Expert

#: progress(phase, done, total, loss): phase is "scoring", "init" or "marginal"
Progress = Callable[[str, int, int, "float | None"], None]


@dataclass
class Features:
    """What the frozen models say about each answer token, in conversation order.

    ``hidden`` (N, H) the base's final hidden state where the token is predicted;
    ``log_probs`` (N, k+1) each model's log-probability of the gold token (column
    0 the base); ``hits`` (N, k+1) whether it is that model's top-1; ``offsets``
    (E+1,) where each conversation's tokens start."""

    hidden: "torch.Tensor"
    log_probs: "torch.Tensor"
    hits: "torch.Tensor"
    offsets: "torch.Tensor"

    def rows(self, conversations: Sequence[int]) -> "torch.Tensor":
        """Token rows of the given conversations."""
        import torch

        return torch.cat([torch.arange(int(self.offsets[c]), int(self.offsets[c + 1])) for c in conversations])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: getattr(self, k).contiguous() for k in ("hidden", "log_probs", "hits", "offsets")}, str(path))

    @classmethod
    def load(cls, path: Path) -> "Features":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["hidden"], t["log_probs"], t["hits"], t["offsets"])


def _batch(items: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Right-padded ids and mask (B, T); for every answer token, its row, the position
    that predicts it and its id (N,) each."""
    import torch

    width = max(len(p) + len(a) for p, a in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    rows, cols, gold = [], [], []
    for i, (p, a) in enumerate(items):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        rows += [i] * len(a)
        cols += list(range(len(p) - 1, len(seq) - 1))
        gold += a
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(gold)


def answer_states(lm: Any, items: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """One forward of ``lm`` (a HF causal LM) over a batch: (hidden (N, H), logits (N, V)
    float32, gold (N,)) at every answer token. The vocabulary projection runs only
    where an answer token is predicted."""
    import torch

    ids, mask, rows, cols, gold = _batch(items, pad)
    dev = next(lm.parameters()).device
    decoder = lm.get_decoder()
    hidden = decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state  # (B, T, H)
    picked = hidden[rows.to(dev), cols.to(dev)]  # (N, H)
    logits = lm.get_output_embeddings()(picked).float()  # (N, V)
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return picked, logits, gold.to(dev)


def score_data(
    base: "Expert",
    assistants: Sequence["Expert"],
    items: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    progress: Progress | None = None,
) -> Features:
    """Run the frozen base and assistants over ``items`` once (inference mode)."""
    import torch

    from decoding.head import gold_log_probs, top1_hits

    pad = base.tokenizer.pad_token_id
    hidden, logp, hits, offsets = [], [], [], [0]
    models = [base] + list(assistants)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))  # less padding
    per_item: dict[int, tuple[Any, Any, Any]] = {}
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [items[i] for i in chunk]
        cols_lp, cols_hit, h0 = [], [], None
        with torch.inference_mode():
            for m, expert in enumerate(models):
                h, logits, gold = answer_states(expert.model, batch, pad)
                if m == 0:
                    h0 = h.float().cpu()
                cols_lp.append(gold_log_probs(logits, gold).cpu())
                cols_hit.append(top1_hits(logits, gold).cpu())
        lp, ht = torch.stack(cols_lp, dim=1), torch.stack(cols_hit, dim=1)
        at = 0
        for i in chunk:
            n = len(items[i][1])
            per_item[i] = (h0[at : at + n], lp[at : at + n], ht[at : at + n])
            at += n
        done += len(chunk)
        if progress is not None:
            progress("scoring", done, len(items), None)
    for i in range(len(items)):
        h, lp, ht = per_item[i]
        hidden.append(h)
        logp.append(lp)
        hits.append(ht)
        offsets.append(offsets[-1] + len(h))
    return Features(torch.cat(hidden).clone(), torch.cat(logp).clone(), torch.cat(hits).clone(), torch.tensor(offsets))
