"""``/v1/completions`` with ``echo`` and ``max_tokens: 0``: the prompt's token
log-probabilities, as vLLM returns them, which is how ``RemoteExpert.loglikelihood``
scores text on another server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from collab.errors import ContextLengthError

if TYPE_CHECKING:
    from collab.experts import Expert


def prompt_logprobs(expert: "Expert", text: str, top: int) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object over ``text``: each token, its log-probability
    given the tokens before it (None for the first), its character offset and the
    ``top`` most likely tokens at its position."""
    import torch

    enc = expert.tokenizer(text, return_offsets_mapping=True)
    ids = list(enc.input_ids) or [expert.eos_token_ids[0]]
    offsets = [int(s) for s, _ in enc.offset_mapping] or [0]
    if len(ids) > expert.context_window:
        raise ContextLengthError(f"prompt has {len(ids)} tokens; expert '{expert.name}' has a context window of {expert.context_window} tokens")
    logits = expert.forward(torch.tensor([ids]), use_cache=False).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    decode = expert.tokenizer.decode
    tokens = [decode([i]) for i in ids]
    token_lps: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    k = max(1, int(top))
    for pos in range(1, len(ids)):
        row = logp[pos - 1]
        token_lps.append(float(row[ids[pos]]))
        vals, idx = row.topk(k)
        tops.append({decode([int(j)]): float(v) for v, j in zip(vals, idx)})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
