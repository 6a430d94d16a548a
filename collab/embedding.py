"""Mean-pooled hidden states of a causal LM: a text's vector at chosen layers.

Layer ``l`` means what ``output_hidden_states`` calls ``hidden_states[l]``: the
output of decoder layer ``l`` (1-based), and for the last layer the output after
the model's final norm. The forward pass stops after the deepest layer asked for,
so shallow layers cost only their share of the model. Batches are right-padded
(real tokens keep their positions and never attend to padding) and sorted by
length, so a text's vector does not depend on what it was batched with beyond
float rounding.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from collab.errors import CollabError


class _Stop(Exception):
    """Raised from a hook after the deepest layer needed, to skip the rest of the model."""


def decoder_parts(model: Any) -> tuple[Any, Any, Any]:
    """(base model, its list of decoder layers, its final norm) of a HF causal LM."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None)
    if layers is None or norm is None:
        raise CollabError(f"{type(model).__name__}: cannot find its decoder layers and final norm (expected .layers and .norm on the base model)")
    return base, layers, norm


def pooled_hidden_states(model: Any, tokenizer: Any, texts: Sequence[str], layers: Sequence[int], max_tokens: int = 256, batch_size: int = 16) -> np.ndarray:
    """(n, len(layers) * hidden) float32: per text, the mask-weighted mean over its tokens
    (first ``max_tokens``) of each asked layer's hidden states, blocks in ``layers`` order."""
    import torch

    base, blocks, norm = decoder_parts(model)
    n_layers = len(blocks)
    want = [int(x) for x in layers]
    bad = [x for x in want if not 1 <= x <= n_layers]
    if not want or bad:
        raise CollabError(f"layers: expected numbers from 1 to {n_layers} (this model's decoder layers), found {list(layers)!r}")
    deepest = max(want)
    hidden = int(model.config.get_text_config().hidden_size)
    out = np.zeros((len(texts), len(want) * hidden), dtype=np.float32)
    if not texts:
        return out
    ids = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    if any(len(x) == 0 for x in ids):
        raise CollabError("embedding: a text gave no tokens (empty prompt?)")
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    seen: dict[int, Any] = {}

    def keep(index: int) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            seen[index] = output[0] if isinstance(output, tuple) else output
            if index == deepest and deepest < n_layers:
                raise _Stop

        return hook

    handles = [blocks[i - 1].register_forward_hook(keep(i)) for i in set(want) if i < n_layers]
    if n_layers in want:
        handles.append(norm.register_forward_hook(keep(n_layers)))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                x[j, : len(ids[i])] = torch.tensor(ids[i])
                mask[j, : len(ids[i])] = 1
            mask = mask.to(device)
            seen.clear()
            with torch.inference_mode():
                try:
                    base(input_ids=x.to(device), attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
                w = mask.unsqueeze(-1).float()
                pooled = [((seen[layer].float() * w).sum(1) / w.sum(1)).cpu().numpy() for layer in want]
            out[rows] = np.concatenate(pooled, axis=1)
    finally:
        for h in handles:
            h.remove()
    return out
