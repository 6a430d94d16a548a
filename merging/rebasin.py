"""Weight matching (Git Re-Basin, Ainsworth et al. 2023) for Llama-style decoders.

Models trained from different initialisations compute the same function under
any permutation of their MLP hidden units and of their attention heads, so
averaging them unit by unit averages unrelated units. Weight matching finds, per
layer, the permutation of the other model's units that best matches the
reference model's weights (a linear assignment on weight inner products), and
applies it before averaging. The residual stream basis is kept (permuting it
would touch every layer and norm at once), so each layer's assignment is exact
and independent: a permuted copy of the reference is recovered exactly.

Permuted units, for layer ``l`` (weights are (out, in)):
- MLP: rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``;
- attention: key/value groups (a kv head with the query heads that share it:
  rows of ``k_proj``/``v_proj`` in blocks of ``head_dim``, rows of ``q_proj``
  and columns of ``o_proj`` in blocks of ``group * head_dim``), then the query
  heads within each group. Whole heads move, so rotary embeddings still apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

REFERENCE_URL = "https://arxiv.org/abs/2209.04836"


@dataclass
class LayerPerms:
    """Index permutations of one layer of a model, to be applied as ``w[perm]``."""

    mlp: Any | None = None  # (intermediate,) over MLP hidden units
    q_heads: Any | None = None  # (num_heads,) over query heads
    kv_heads: Any | None = None  # (num_kv_heads,) over key/value heads


def _assign(cost: Any) -> Any:
    """The permutation p maximising sum_a cost[a, p[a]]."""
    import torch
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.double().numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def _blocks(w: Any, n: int) -> Any:
    """(n*k, in) rows -> (n, k*in)."""
    return w.reshape(n, -1)


def match_layer(get_ref: Callable[[str], Any], get_other: Callable[[str], Any], prefix: str, cfg: dict[str, Any]) -> LayerPerms:
    """Permutations aligning ``other``'s layer ``prefix`` (e.g. ``model.layers.3.``)
    to the reference's. ``get_*`` return float tensors by name, or None."""
    import torch

    perms = LayerPerms()
    gate_a, gate_b = get_ref(prefix + "mlp.gate_proj.weight"), get_other(prefix + "mlp.gate_proj.weight")
    if gate_a is not None and gate_b is not None:
        cost = gate_a @ gate_b.T  # (I, I)
        cost += get_ref(prefix + "mlp.up_proj.weight") @ get_other(prefix + "mlp.up_proj.weight").T
        cost += get_ref(prefix + "mlp.down_proj.weight").T @ get_other(prefix + "mlp.down_proj.weight")
        perms.mlp = _assign(cost)
    heads = int(cfg.get("num_attention_heads") or 0)
    kv = int(cfg.get("num_key_value_heads") or heads)
    q_a = get_ref(prefix + "self_attn.q_proj.weight")
    if not heads or q_a is None:
        return perms
    rep = heads // kv
    q_b = get_other(prefix + "self_attn.q_proj.weight")
    k_a, k_b = get_ref(prefix + "self_attn.k_proj.weight"), get_other(prefix + "self_attn.k_proj.weight")
    v_a, v_b = get_ref(prefix + "self_attn.v_proj.weight"), get_other(prefix + "self_attn.v_proj.weight")
    o_a, o_b = get_ref(prefix + "self_attn.o_proj.weight").T, get_other(prefix + "self_attn.o_proj.weight").T  # (heads*hd, H)
    group_cost = (
        _blocks(q_a, kv) @ _blocks(q_b, kv).T
        + _blocks(k_a, kv) @ _blocks(k_b, kv).T
        + _blocks(v_a, kv) @ _blocks(v_b, kv).T
        + _blocks(o_a, kv) @ _blocks(o_b, kv).T
    )  # (kv, kv)
    groups = _assign(group_cost)
    q_perm = torch.empty(heads, dtype=torch.long)
    qa_h, qb_h = _blocks(q_a, heads), _blocks(q_b, heads)  # (heads, hd*H)
    oa_h, ob_h = _blocks(o_a, heads), _blocks(o_b, heads)
    for g in range(kv):
        a_idx = torch.arange(g * rep, (g + 1) * rep)
        b_idx = torch.arange(int(groups[g]) * rep, (int(groups[g]) + 1) * rep)
        cost = qa_h[a_idx] @ qb_h[b_idx].T + oa_h[a_idx] @ ob_h[b_idx].T  # (rep, rep)
        q_perm[a_idx] = b_idx[_assign(cost)]
    perms.q_heads, perms.kv_heads = q_perm, groups
    return perms


def _expand(perm: Any, block: int) -> Any:
    """A permutation of blocks -> the permutation of their rows."""
    import torch

    return (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def apply(name: str, tensor: Any, perms: LayerPerms, cfg: dict[str, Any]) -> Any:
    """``tensor`` (named as in the checkpoint) of the other model, permuted into
    the reference's unit order; tensors no permutation touches come back as is."""
    heads = int(cfg.get("num_attention_heads") or 1)
    hidden = int(cfg.get("hidden_size") or 0)
    hd = int(cfg.get("head_dim") or (hidden // heads if hidden else 0))
    if perms.mlp is not None:
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
            return tensor[perms.mlp]
        if name.endswith("mlp.down_proj.weight"):
            return tensor[:, perms.mlp]
    if perms.q_heads is not None:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return tensor[_expand(perms.q_heads, hd)]
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
            return tensor[_expand(perms.kv_heads, hd)]
        if name.endswith("self_attn.o_proj.weight"):
            return tensor[:, _expand(perms.q_heads, hd)]
    return tensor
