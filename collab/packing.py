"""Packed rows for scoring continuations (``Expert.loglikelihood_batch``).

A row holds one context followed by several continuations of it. The attention
mask lets each continuation see the context and its own earlier tokens only, and
positions restart after the context, so every continuation is scored as if it
followed the context alone, while the context is run through the model once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from collab.errors import ContextLengthError

if TYPE_CHECKING:
    import torch


@dataclass
class PackedRow:
    """One packed scoring row: a context followed by continuations of it."""

    ctx: list[int]
    conts: list[tuple[int, list[int]]]  # (index of the pair in the caller's list, continuation tokens)

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(len(c) for _, c in self.conts)

    def layout(self, window: int) -> tuple[list[int], list[int], list[list[int]], list[list[int]]]:
        """Tokens, position ids, and for each continuation the row indices whose
        outputs predict its tokens and the tokens themselves."""
        ctx = self.ctx
        if len(self.conts) == 1 and self.length > window:  # one long pair: drop the oldest context tokens
            n = len(self.conts[0][1])
            if n >= window:
                raise ContextLengthError(f"continuation of {n} tokens does not fit the context window of {window} tokens")
            ctx = ctx[len(ctx) + n - window :]
        seq, pos = list(ctx), list(range(len(ctx)))
        preds: list[list[int]] = []
        tgts: list[list[int]] = []
        for _, cont in self.conts:
            start = len(seq)
            preds.append([len(ctx) - 1] + [start + t for t in range(len(cont) - 1)] if cont else [])
            tgts.append(list(cont))
            seq.extend(cont)
            pos.extend(range(len(ctx), len(ctx) + len(cont)))
        return seq, pos, preds, tgts

    def visibility(self, n: int, ctx_len: int) -> "torch.Tensor":
        """(n, n) boolean: query i may attend to key j. Causal over the context;
        each continuation sees the context and its own earlier tokens."""
        import torch

        causal = torch.tril(torch.ones((n, n), dtype=torch.bool))
        segment = torch.zeros(n, dtype=torch.long)  # 0 = context, k = k-th continuation
        start = ctx_len
        for k, (_, cont) in enumerate(self.conts, 1):
            segment[start : start + len(cont)] = k
            start += len(cont)
        same = segment[:, None] == segment[None, :]
        sees_ctx = (segment[None, :] == 0).expand(n, n)
        return causal & (same | sees_ctx)


def pack_rows(split: Sequence[tuple[list[int], list[int]]], limit: int) -> list[PackedRow]:
    """Rows for (context, continuation) token pairs: the continuations of one
    context share rows of at most ``limit`` tokens; a pair longer than ``limit``
    gets a row of its own (truncated on the left when laid out)."""
    by_ctx: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(split):
        by_ctx.setdefault(tuple(ctx), []).append((i, cont))
    rows: list[PackedRow] = []
    for ctx_t, items in by_ctx.items():
        ctx = list(ctx_t)
        row = PackedRow(ctx, [])
        for i, cont in items:
            if len(ctx) + len(cont) > limit:
                rows.append(PackedRow(ctx, [(i, cont)]))
                continue
            if row.conts and row.length + len(cont) > limit:
                rows.append(row)
                row = PackedRow(ctx, [])
            row.conts.append((i, cont))
        if row.conts:
            rows.append(row)
    return rows


@dataclass
class PackedBatch:
    """Model inputs for a batch of rows, and what to read back from the logits."""

    rows: list[PackedRow]
    ids: "torch.Tensor"  # (B, W) token ids, padded
    positions: "torch.Tensor"  # (B, W) position ids
    mask: "torch.Tensor"  # (B, 1, W, W) additive attention mask in the model's dtype
    keep: "torch.Tensor"  # (B, W) positions whose logits are needed
    preds: list[list[list[int]]]  # per row, per continuation: positions predicting its tokens
    targets: list[list[list[int]]]  # per row, per continuation: its tokens

    @classmethod
    def build(cls, rows: list[PackedRow], window: int, pad_id: int, dtype: Any) -> "PackedBatch":
        import torch

        seqs, positions, preds, targets = [], [], [], []
        for row in rows:
            seq, pos, pred, tgt = row.layout(window)
            seqs.append(seq)
            positions.append(pos)
            preds.append(pred)
            targets.append(tgt)
        width = max(len(s) for s in seqs)
        b = len(rows)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        pos_ids = torch.zeros((b, width), dtype=torch.long)
        allowed = torch.zeros((b, width, width), dtype=torch.bool)
        keep = torch.zeros((b, width), dtype=torch.bool)
        for r, (row, seq, pos, pred, tgt) in enumerate(zip(rows, seqs, positions, preds, targets)):
            n = len(seq)
            ids[r, :n] = torch.tensor(seq)
            pos_ids[r, :n] = torch.tensor(pos)
            allowed[r, :n, :n] = row.visibility(n, n - sum(len(t) for t in tgt))
            allowed[r, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding attends to itself only
            for p_cont in pred:
                keep[r, p_cont] = True
        mask = torch.zeros((b, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        return cls(rows, ids, pos_ids, mask, keep, preds, targets)

    def scores(self, logits: "torch.Tensor") -> list[tuple[int, tuple[float, bool]]]:
        """(pair index, (summed log-probability, greedy)) for every continuation,
        from the logits at the ``keep`` positions, flattened row-major."""
        import torch

        b, width = self.keep.shape
        logp = torch.log_softmax(logits.float(), dim=-1)
        flat_index = torch.cumsum(self.keep.flatten(), 0).view(b, width) - 1
        results: list[tuple[int, tuple[float, bool]]] = []
        for r, (row, pred, tgt) in enumerate(zip(self.rows, self.preds, self.targets)):
            for (i, _), p_idx, t in zip(row.conts, pred, tgt):
                if not p_idx:
                    results.append((i, (0.0, True)))
                    continue
                lp = logp[flat_index[r, p_idx]]
                target = torch.tensor(t, device=lp.device)
                total = float(lp.gather(1, target[:, None]).sum())
                results.append((i, (total, bool((lp.argmax(-1) == target).all()))))
        return results
