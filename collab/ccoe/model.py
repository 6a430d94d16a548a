"""The shared backbone and its branches: one forward pass over a batch whose rows
go to different experts.

CCoE (Li et al. 2024, https://arxiv.org/abs/2407.11686): a frozen base model of
N decoder layers is the backbone; an expert is its own copy of the top layers,
from its depth d (the index of its first own layer) to N - 1. A query runs
through the backbone's layers below d, then through the expert's layers; the
embeddings, the final norm and the LM head stay the base's, shared and frozen.

``CCoEModel.forward`` runs a batch layer by layer. At layer i each row uses the
base's layer unless its branch starts at or below i; rows that use the same
weights run together, so the layers every row shares (the backbone) run once for
the whole batch, and a row whose branch starts deeper continues through the
base's frozen layers until its depth. Each row keeps one KV cache across all
layers (a plain ``DynamicCache`` over the batch): at a layer where rows split,
each group reads its rows of the cache and the new keys and values of all groups
are written back together.

This module knows nothing about tokenisation or requests. Shapes: B rows, T new
tokens, P cached tokens, H hidden width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from collab.embedding import decoder_parts
from collab.errors import CollabError

reference_url = "https://arxiv.org/abs/2407.11686"

#: Model types whose forward pass is embed -> decoder layers -> final norm -> LM head
#: with full attention in every layer; others are checked against their own forward.
KNOWN_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class CCoEModelError(CollabError):
    """A base model or a branch that CCoE cannot run (an architecture, a shape, a depth)."""


def layers_prefix(model: Any) -> str:
    """The state-dict prefix of ``model``'s decoder layers (``model.layers`` for a HF Llama)."""
    _, layers, _ = decoder_parts(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise CCoEModelError(
        f"{type(model).__name__}: its decoder layers are not a submodule of the model"
    )


def num_layers(model: Any) -> int:
    """How many decoder layers ``model`` has."""
    return len(decoder_parts(model)[1])


def is_branch_key(key: str, prefix: str, depth: int) -> bool:
    """Whether the state-dict ``key`` belongs to a decoder layer at index >= ``depth``."""
    if not key.startswith(prefix + "."):
        return False
    index = key[len(prefix) + 1 :].split(".", 1)[0]
    return index.isdigit() and int(index) >= depth


_DIGESTS: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def tensor_digests(model: Any) -> dict[str, str]:
    """sha256 of every tensor of ``model``'s state dict (its float32 bytes, dtype name
    and shape), by key; computed once per model object (the base is frozen)."""
    if model in _DIGESTS:
        return _DIGESTS[model]
    out = {}
    for key, t in model.state_dict().items():
        h = hashlib.sha256(f"{key}:{tuple(t.shape)}".encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        out[key] = h.hexdigest()
    _DIGESTS[model] = out
    return out


def backbone_fingerprint(model: Any, depth: int) -> str:
    """sha256 over the tensors a branch at ``depth`` shares with ``model``: the
    embeddings, the decoder layers below ``depth``, the final norm and the LM head
    (every tensor but those of the layers it replaces)."""
    prefix = layers_prefix(model)
    digests = tensor_digests(model)
    h = hashlib.sha256()
    for key in sorted(digests):
        if not is_branch_key(key, prefix, depth):
            h.update(f"{key}={digests[key]}\n".encode())
    return h.hexdigest()


def branch_tensors(
    layers: Sequence[nn.Module], prefix: str, depth: int
) -> dict[str, torch.Tensor]:
    """A branch's layers' tensors under their keys in the full model (``model.layers.{i}.*``)."""
    return {
        f"{prefix}.{depth + j}.{k}": v
        for j, layer in enumerate(layers)
        for k, v in layer.state_dict().items()
    }


@dataclass
class Branch:
    """One expert: its name, its depth (the index of its first own layer) and its
    own decoder layers, which replace the base's from ``depth`` to the last."""

    name: str
    depth: int
    layers: nn.ModuleList

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The branch's tensors under their keys in the full model."""
        return branch_tensors(list(self.layers), prefix, self.depth)


def copy_top_layers(model: Any, depth: int) -> nn.ModuleList:
    """Copies of ``model``'s decoder layers from ``depth`` to the last (an untrained branch)."""
    _, layers, _ = decoder_parts(model)
    if not 0 <= depth < len(layers):
        raise CCoEModelError(
            f"depth: expected 0 <= depth < {len(layers)} (the base's decoder layers), found {depth!r}"
        )
    return nn.ModuleList(copy.deepcopy(layers[i]) for i in range(depth, len(layers)))


def load_branch(
    model: Any, name: str, depth: int, tensors: dict[str, torch.Tensor]
) -> Branch:
    """A Branch of ``model`` at ``depth`` with ``tensors`` (keys as in the full model);
    CCoEModelError naming the first missing, unexpected or misshapen tensor."""
    prefix = layers_prefix(model)
    layers = copy_top_layers(model, depth)
    want = branch_tensors(list(layers), prefix, depth)
    for key in sorted(set(want) | set(tensors)):
        if key not in tensors:
            raise CCoEModelError(
                f"branch '{name}': tensor {key} is missing (a branch at depth {depth} holds layers {depth}..{len(layers) + depth - 1})"
            )
        if key not in want:
            raise CCoEModelError(
                f"branch '{name}': tensor {key} is not one of its layers (depth {depth}, {len(layers)} layers)"
            )
        if tuple(tensors[key].shape) != tuple(want[key].shape):
            raise CCoEModelError(
                f"branch '{name}': {key} has shape {tuple(tensors[key].shape)}, the base's has {tuple(want[key].shape)}"
            )
    with torch.no_grad():
        for j, layer in enumerate(layers):
            inner = f"{prefix}.{depth + j}."
            layer.load_state_dict(
                {k[len(inner) :]: v for k, v in tensors.items() if k.startswith(inner)},
                strict=True,
            )
    return Branch(name, depth, layers)


class _RowsCache:
    """What one group of rows sees of the batch's KV cache at one layer: its rows'
    cached keys and values followed by its new ones. The new ones are kept in
    ``pending`` and written to the batch's cache once every group has run."""

    def __init__(
        self,
        full: Any,
        rows: torch.Tensor,
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> None:
        self.full = full
        self.rows = rows
        self.pending = pending

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.pending.append((self.rows, key_states, value_states))  # (b, heads, T, d)
        layer = self.full.layers[layer_idx]
        if (
            not getattr(layer, "is_initialized", False)
            or layer.keys is None
            or layer.keys.numel() == 0
        ):
            return key_states, value_states
        return torch.cat([layer.keys[self.rows], key_states], dim=-2), torch.cat(
            [layer.values[self.rows], value_states], dim=-2
        )


def _commit(
    cache: Any,
    layer_idx: int,
    batch: int,
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> None:
    """Write every group's new keys and values of one layer into the batch's cache."""
    _, k0, v0 = pending[0]
    keys = k0.new_empty((batch, *k0.shape[1:]))  # (B, heads, T, d)
    values = v0.new_empty((batch, *v0.shape[1:]))
    for rows, k, v in pending:
        keys[rows] = k
        values[rows] = v
    cache.update(keys, values, layer_idx)


class CCoEModel:
    """A frozen base causal LM and its branches, run as one model whose rows may
    each take another branch. The base's modules are used as they are (nothing is
    copied or changed); each branch holds only its own layers."""

    def __init__(
        self, model: Any, branches: Sequence[Branch] = (), *, check: bool = True
    ) -> None:
        self.model = model
        self.base, self.layers, self.norm = decoder_parts(model)
        for part in ("embed_tokens", "rotary_emb"):
            if getattr(self.base, part, None) is None:
                raise CCoEModelError(
                    f"{type(model).__name__}: CCoE needs a decoder with .{part} (Llama, Mistral, Qwen2)"
                )
        self.head = model.get_output_embeddings()
        self.config = model.config.get_text_config()
        types = getattr(self.config, "layer_types", None) or []
        if any(t != "full_attention" for t in types):
            raise CCoEModelError(
                f"{self.config.model_type}: CCoE runs models with full attention in every layer; this one has {sorted(set(types))}"
            )
        self.prefix = layers_prefix(model)
        self.n_layers = len(self.layers)
        self.branches: dict[str, Branch] = {}
        params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        from transformers import masking_utils

        self._mask_fn = masking_utils.create_causal_mask
        self._mask_cache_kw = (
            "cache"
            if "cache" in inspect.signature(self._mask_fn).parameters
            else "past_key_values"
        )
        for b in branches:
            self.add(b)
        if check:
            self.check_parity()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add(self, branch: Branch) -> None:
        """Attach ``branch`` (its layers move to the base's device and dtype)."""
        if branch.name in self.branches:
            raise CCoEModelError(f"branch '{branch.name}' is attached twice")
        if (
            not 0 <= branch.depth < self.n_layers
            or len(branch.layers) != self.n_layers - branch.depth
        ):
            raise CCoEModelError(
                f"branch '{branch.name}': depth {branch.depth} with {len(branch.layers)} layers does not fit a base of {self.n_layers} layers"
            )
        dtype = next(self.model.parameters()).dtype
        branch.layers.to(device=self.device, dtype=dtype)
        self.branches[branch.name] = branch

    def check_parity(self) -> None:
        """CCoEModelError unless this forward pass gives the base's own logits (with no
        branch taken) on a short input: the architecture computes nothing this module
        leaves out (embedding scales, sliding windows, soft-capping)."""
        ids = torch.arange(1, 7, device=self.device)[None] % int(self.config.vocab_size)
        with torch.inference_mode():
            ours = self.forward(ids, [None]).logits
            theirs = self.model(input_ids=ids, use_cache=False).logits
        if not torch.allclose(ours.float(), theirs.float(), atol=1e-4, rtol=1e-4):
            raise CCoEModelError(
                f"{self.config.model_type}: this architecture's forward pass is not embed -> decoder layers -> norm -> head "
                f"(CCoE's shared backbone gives other logits than the model itself); supported: {', '.join(KNOWN_TYPES)}"
            )

    # ------------------------------------------------------------------ plan
    def plan(
        self, row_branches: Sequence[str | None]
    ) -> list[list[tuple[nn.Module, list[int]]]]:
        """Per decoder layer: (the module, the rows that run through it), rows that
        share the module together, in the order of their first row."""
        for b in row_branches:
            if b is not None and b not in self.branches:
                raise CCoEModelError(
                    f"unknown branch '{b}'; attached: {', '.join(self.branches) or 'none'}"
                )
        out = []
        for i in range(self.n_layers):
            groups: dict[str | None, list[int]] = {}
            for r, b in enumerate(row_branches):
                key = b if b is not None and i >= self.branches[b].depth else None
                groups.setdefault(key, []).append(r)
            out.append([(self.layer(key, i), rows) for key, rows in groups.items()])
        return out

    def layer(self, branch: str | None, i: int) -> nn.Module:
        """Decoder layer ``i`` as ``branch`` (None: the base) runs it."""
        if branch is None or i < self.branches[branch].depth:
            return self.layers[i]
        b = self.branches[branch]
        return b.layers[i - b.depth]

    # --------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        row_branches: Sequence[str | None],
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        grad: bool = False,
    ) -> Any:
        """Logits (B, T or logits_to_keep, V) of ``input_ids`` (B, T), row b through
        the backbone and then ``row_branches[b]`` (None: the base's own layers).

        ``attention_mask`` (B, P + T) covers the cached tokens and the new ones;
        ``position_ids`` (B, T) place left-padded rows; ``cache`` is the batch's
        ``DynamicCache`` (None: no cache). With ``grad`` the layers below the first
        one holding a trainable parameter run without autograd (the frozen backbone
        needs no graph), the rest with it. Returns ``.logits``, ``.cache`` and, if
        asked, ``.hidden_states`` (the embeddings, then each layer; the last after
        the final norm, as transformers gives them)."""
        if len(row_branches) != input_ids.shape[0]:
            raise CCoEModelError(
                f"forward: {input_ids.shape[0]} rows but {len(row_branches)} branch choices"
            )
        dev = self.device
        ids = input_ids.to(dev)
        batch, width = ids.shape
        plan = self.plan(row_branches)
        first_trainable = self.n_layers
        if grad:
            trainable = [
                i
                for i, groups in enumerate(plan)
                if any(p.requires_grad for m, _ in groups for p in m.parameters())
            ]
            first_trainable = trainable[0] if trainable else self.n_layers
        mode = contextlib.nullcontext() if grad else torch.inference_mode()
        with mode:
            with torch.no_grad() if first_trainable > 0 else contextlib.nullcontext():
                h = self.base.embed_tokens(ids)  # (B, T, H)
            if position_ids is None:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = (torch.arange(width, device=dev) + past)[None].expand(
                    batch, -1
                )
            pos = position_ids.to(dev)
            mask_args = {
                "config": self.config,
                "inputs_embeds": h,
                "attention_mask": None
                if attention_mask is None
                else attention_mask.to(dev),
                self._mask_cache_kw: cache,
                "position_ids": pos,
            }
            mask = self._mask_fn(
                **mask_args
            )  # (B, 1, T, P + T), or None for a plain causal mask
            cos, sin = self.base.rotary_emb(
                h, position_ids=pos
            )  # each (B, T, head_dim)
            hidden = [h] if output_hidden_states else None
            for i, groups in enumerate(plan):
                with (
                    torch.no_grad() if i < first_trainable else contextlib.nullcontext()
                ):
                    if len(groups) == 1:
                        h = self._run(groups[0][0], h, mask, (cos, sin), pos, cache)
                    else:
                        h = self._run_groups(i, groups, h, mask, (cos, sin), pos, cache)
                if hidden is not None:
                    hidden.append(h)
            h = self.norm(h)
            if hidden is not None:
                hidden[-1] = h
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            logits = self.head(h)  # (B, T, V)
        return SimpleNamespace(
            logits=logits,
            cache=cache,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )

    def _run(
        self,
        module: nn.Module,
        h: torch.Tensor,
        mask: Any,
        pe: tuple[torch.Tensor, torch.Tensor],
        pos: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        out = module(
            h,
            attention_mask=mask,
            position_ids=pos,
            use_cache=cache is not None,
            position_embeddings=pe,
            **{self._cache_kw: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    def _run_groups(
        self,
        i: int,
        groups: list[tuple[nn.Module, list[int]]],
        h: torch.Tensor,
        mask: Any,
        pe: tuple[torch.Tensor, torch.Tensor],
        pos: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Layer ``i`` where rows take different weights: each group on its rows."""
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        out = torch.empty_like(h)
        cos, sin = pe
        for module, rows in groups:
            idx = torch.tensor(rows, dtype=torch.long, device=h.device)
            m = (
                mask[idx]
                if isinstance(mask, torch.Tensor) and mask.shape[0] > 1
                else mask
            )
            view = _RowsCache(cache, idx, pending) if cache is not None else None
            out[idx] = self._run(
                module, h[idx], m, (cos[idx], sin[idx]), pos[idx], view
            )
        if cache is not None:
            _commit(cache, i, h.shape[0], pending)
        return out


def parameter_bytes(modules: Sequence[Any]) -> int:
    """Bytes of the distinct parameters and buffers of ``modules`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total
