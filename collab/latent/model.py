"""Interaction layers between frozen experts, attached with forward hooks.

Mixture of Thoughts (Fein-Ashley et al. 2025, https://arxiv.org/abs/2509.21164):
each expert's L_m decoder layers are cut into Q stacks of about L_m / Q layers.
After stack q the active experts' hidden states are projected into one shared
latent space (width D) and the primary expert cross-attends to the concatenation
of its peers' projected states; the result, through a zero-initialised gate, is
added to the primary's residual stream before its next stack runs.

The experts' code and state-dict keys stay as they are: an interaction is a
forward hook on the decoder layer that ends a stack (``attached``), installed
for the duration of one forward pass and removed after it. This module knows
nothing about tokenisation: each expert reads its own tokens of the query, and
the primary's tokens attend to every peer token (no alignment).

Shapes: B rows, T primary tokens, S peer tokens (all peers of a row, padded),
d_m an expert's hidden width, D the latent width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from collab.embedding import decoder_parts
from collab.errors import CollabError

if TYPE_CHECKING:
    from collab.experts import Expert

reference_url = "https://arxiv.org/abs/2509.21164"


def cut_points(n_layers: int, stacks: int) -> list[int]:
    """The 1-based decoder layers that end each of ``stacks`` equal stacks (the last is ``n_layers``)."""
    if not 1 <= stacks <= n_layers:
        raise CollabError(f"stacks: expected 1 <= Q <= {n_layers} (the expert's decoder layers), found {stacks!r}")
    return [(q + 1) * n_layers // stacks for q in range(stacks)]


def expert_shape(expert: "Expert") -> tuple[int, int]:
    """(hidden width, number of decoder layers) of an expert's model."""
    _, layers, _ = decoder_parts(expert.model)
    return int(expert.model.config.get_text_config().hidden_size), len(layers)


class InteractionLayer(nn.Module):
    """One expert's interaction at the end of one stack.

    ``project`` maps the expert's hidden states into the shared latent space
    (used for its queries when it is the primary and for its keys and values
    when it is a peer); ``forward`` adds to the primary's hidden states
    tanh(gate) * up(cross_attention(project(h), peers)). The gate starts at
    zero, so an untrained layer returns ``h`` exactly."""

    def __init__(self, hidden: int, latent: int, heads: int) -> None:
        super().__init__()
        if latent % heads:
            raise CollabError(f"latent_dim: {latent} is not divisible by heads={heads}")
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, latent)
        self.attn = nn.MultiheadAttention(latent, heads, batch_first=True)
        self.up = nn.Linear(latent, hidden)
        self.gate = nn.Parameter(torch.zeros(()))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_m) -> (..., D) in float32."""
        return self.down(self.norm(h.float()))

    def forward(self, h: torch.Tensor, memory: "Memory", stack: int) -> torch.Tensor:
        keys = memory.keys[stack]  # (B, S, D)
        values = keys * memory.weights[..., None]  # each peer's states scaled by its router weight
        out, _ = self.attn(self.project(h), keys, values, key_padding_mask=memory.pad, need_weights=False)  # (B, T, D)
        return h + (torch.tanh(self.gate) * self.up(out)).to(h.dtype)


class Interactions(nn.Module):
    """Every expert's interaction layers: ``layers[m][q]`` for expert m, stack q.

    Only these and the router train; ``cuts[m]`` are the layers they hook."""

    def __init__(self, shapes: Sequence[tuple[int, int]], stacks: int, latent: int, heads: int) -> None:
        super().__init__()
        self.stacks = stacks
        self.cuts = [cut_points(n, stacks) for _, n in shapes]
        self.layers = nn.ModuleList(nn.ModuleList(InteractionLayer(d, latent, heads) for _ in range(stacks)) for d, _ in shapes)

    def gates(self) -> list[list[float]]:
        """tanh(gate) of every layer, per expert (what an interaction lets through)."""
        return [[round(float(torch.tanh(layer.gate.detach())), 6) for layer in per] for per in self.layers]


@dataclass
class Memory:
    """What the primary's rows attend to: per stack, the peers' projected states
    (B, S, D); ``pad`` (B, S) is True where a row has no peer token; ``weights``
    (B, S) the router weight of the peer each token belongs to."""

    keys: list[torch.Tensor]
    pad: torch.Tensor
    weights: torch.Tensor


@contextlib.contextmanager
def attached(expert: "Expert", layers: Sequence[InteractionLayer], cuts: Sequence[int], memory: Memory | None) -> Iterator[None]:
    """Run ``expert``'s forward passes inside the block with the interaction
    layers hooked after ``cuts`` (holding the expert's lock, so no other caller
    sees them). ``memory`` None attaches nothing: the expert alone."""
    if memory is None:
        yield
        return
    _, blocks, _ = decoder_parts(expert.model)

    def hook_for(stack: int, layer: InteractionLayer) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (layer(output[0], memory, stack), *output[1:])
            return layer(output, memory, stack)

        return hook

    with expert._lock:
        handles = [blocks[c - 1].register_forward_hook(hook_for(q, layer)) for q, (c, layer) in enumerate(zip(cuts, layers))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids), each (B, T): rows left-padded so every row ends in the last column."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, pos


def stack_states(expert: "Expert", prompts: Sequence[Sequence[int]], cuts: Sequence[int]) -> list[list[torch.Tensor]]:
    """Per prompt, per stack: the expert's hidden states (n_tokens, d_m) at the end of
    the stack, read without gradients (decoder only; the LM head is not run)."""
    base, blocks, _ = decoder_parts(expert.model)
    ids, mask, pos = left_pad(prompts, expert.tokenizer.pad_token_id)
    seen: dict[int, torch.Tensor] = {}

    def keep(stack: int) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            seen[stack] = output[0] if isinstance(output, tuple) else output

        return hook

    dev = expert.device
    with expert._lock:
        handles = [blocks[c - 1].register_forward_hook(keep(q)) for q, c in enumerate(cuts)]
        try:
            with torch.no_grad():
                base(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=False)
        finally:
            for h in handles:
                h.remove()
    width = ids.shape[1]
    return [[seen[q][i, width - len(p) :].detach() for q in range(len(cuts))] for i, p in enumerate(prompts)]


def build_memory(
    interactions: Interactions,
    experts: Sequence["Expert"],
    rows: Sequence[Sequence[tuple[int, float, Sequence[int]]]],
) -> Memory:
    """The primary batch's memory. ``rows[b]`` lists row b's peers as (expert index,
    router weight, the peer's prompt ids). Each peer expert runs once over all the
    prompts it reads (no gradients); the projections into the latent space keep
    theirs, so the peers' adapters train through the primary's loss."""
    wanted: dict[int, list[tuple[int, int]]] = {}  # expert -> [(row, peer slot)]
    for b, peers in enumerate(rows):
        if not peers:
            raise CollabError("build_memory: every row of a mixture needs at least one peer (top_k >= 2)")
        for slot, (m, _, _) in enumerate(peers):
            wanted.setdefault(m, []).append((b, slot))
    projected: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m, where in wanted.items():
        unique = list(dict.fromkeys(tuple(rows[b][slot][2]) for b, slot in where))  # four answers to one question: one pass
        states = dict(zip(unique, stack_states(experts[m], unique, interactions.cuts[m])))
        for b, slot in where:
            per_stack = states[tuple(rows[b][slot][2])]
            projected[(b, slot)] = [interactions.layers[m][q].project(h) for q, h in enumerate(per_stack)]
    from torch.nn.utils.rnn import pad_sequence

    dev = next(iter(projected.values()))[0].device
    keys = [
        pad_sequence([torch.cat([projected[(b, slot)][q] for slot in range(len(peers))]) for b, peers in enumerate(rows)], batch_first=True)
        for q in range(interactions.stacks)
    ]  # per stack (B, S, D)
    weights = pad_sequence(
        [torch.cat([torch.as_tensor(w, dtype=torch.float32, device=dev).reshape(1).expand(len(ids)) for _, w, ids in peers]) for peers in rows],
        batch_first=True,
    )  # (B, S); a tensor weight keeps its gradient (the router's, in training)
    lengths = torch.tensor([sum(len(ids) for _, _, ids in peers) for peers in rows], device=dev)
    pad = torch.arange(keys[0].shape[1], device=dev)[None] >= lengths[:, None]  # (B, S)
    return Memory(keys, pad, weights)


def primary_logits(
    expert: "Expert", interactions: Interactions, m: int, rows: Sequence[Sequence[int]], memory: Memory | None, *, grad: bool, keep: int
) -> torch.Tensor:
    """Expert ``m`` as the primary over whole token rows (no KV cache), its interaction
    layers attending to ``memory`` (None: the expert alone): the logits (B, keep, V)
    of the last ``keep`` columns; rows are left-padded, so they all end in the last column."""
    ids, mask, pos = left_pad(rows, expert.tokenizer.pad_token_id)
    with attached(expert, interactions.layers[m], interactions.cuts[m], memory):
        out = expert.forward(ids, attention_mask=mask, position_ids=pos, use_cache=False, grad=grad, logits_to_keep=keep)
    return out.logits[:, -keep:]
