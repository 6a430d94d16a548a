"""Moving a CCoE expert in and out of the collaboration (``collab ccoe pop|push``).

- ``pop_expert``: the expert as a standalone model, a plain Hugging Face directory
  (float32 safetensors, config, generation config, the base's tokenizer files):
  the base's weights with the expert's layers in place of its top ones. ``collab
  merge``, ``collab eval``, ``Expert.load`` and transformers load it like any model.
- ``push_expert``: the reverse, for a model fine-tuned outside collab: its top
  ``layers`` layers become a CCoE expert of the base, provided every other tensor
  (embeddings, the layers below, the final norm, the head) equals the base's
  exactly; otherwise a CollabError names the first tensor that differs.

Pop then push gives back the expert's tensors bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from collab.artefacts import check_output
from collab.ccoe.artefact import (
    CCoEArtefactError,
    CCoEConfig,
    open_branch,
    read_config,
    save_expert,
)
from collab.errors import CollabError
from collab.training import load_expert

if TYPE_CHECKING:
    from collab.experts import Expert

#: Written beside a popped model: where it came from.
PROVENANCE_FILE = "collab_ccoe.json"


def _base_dir(expert: Expert) -> Path | None:
    """The model directory ``expert`` was loaded from (a GGUF's de-quantised cache), if known."""
    from collab.refs import dequantised_dir, resolve_ref

    if not expert.ref:
        return None
    try:
        res = resolve_ref(expert.ref)
    except CollabError:
        return None
    if res.adapter is not None:
        return None
    return dequantised_dir(res) if res.gguf_file else res.path


def pop_expert(
    expert_dir: str | Path,
    out: str | Path,
    *,
    base: str | Expert | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the CCoE expert in ``expert_dir`` as a standalone Hugging Face model
    directory ``out`` (atomically); ``base`` defaults to the reference the expert
    was trained on. CCoEArtefactError if the base is not the one it was trained on."""
    import copy

    import torch

    from collab.ccoe.model import branch_tensors, layers_prefix
    from collab.io import TOKENIZER_FILES, atomic_directory, atomic_write_json

    out = Path(out)
    check_output(out, overwrite, "a CCoE expert or model directory", "the new one")
    config = read_config(expert_dir)
    expert = load_expert(base if base is not None else config.base)
    branch, config = open_branch(
        expert.model, expert_dir, base_name=f"the base {expert.ref or expert.name}"
    )
    model = copy.deepcopy(expert.model).float()
    prefix = layers_prefix(model)
    state = branch_tensors(list(branch.layers), prefix, branch.depth)
    with torch.no_grad():
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        for key, value in state.items():
            own[key].copy_(value)
    for holder in (
        model.config,
        getattr(model, "hf_quantizer", None),
    ):  # a GGUF-loaded model refuses save_pretrained
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    source = _base_dir(expert)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        copied = False
        if source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
                    copied = True
        if not copied:
            expert.tokenizer.save_pretrained(str(tmp))
        if (
            not (tmp / "generation_config.json").is_file()
            and getattr(model, "generation_config", None) is not None
        ):
            model.generation_config.save_pretrained(str(tmp))
        atomic_write_json(
            tmp / PROVENANCE_FILE,
            {
                "popped_from": str(expert_dir),
                "name": config.name,
                "base": config.base,
                "depth": config.depth,
                "layers": config.layers,
                "backbone_sha256": config.backbone_sha256,
                "reference_url": config.reference_url,
            },
        )
    return out


def push_expert(
    base: str | Expert,
    model: str | Expert,
    layers: int,
    out: str | Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Make the top ``layers`` decoder layers of ``model`` (a reference or an Expert,
    e.g. a popped and further fine-tuned expert) a CCoE expert of ``base`` in ``out``
    (atomically). CCoEArtefactError naming the first tensor outside those layers that
    differs from the base's (or is missing, or has another shape)."""
    import torch

    from collab.ccoe.model import (
        backbone_fingerprint,
        is_branch_key,
        layers_prefix,
        num_layers,
    )

    out = Path(out)
    check_output(out, overwrite, "a CCoE expert or model directory", "the new one")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise CollabError(f"--layers: expected an integer >= 1, found {layers!r}")
    b = load_expert(base)
    m = load_expert(model)
    what = f"{m.ref or m.name}"
    n = num_layers(b.model)
    if num_layers(m.model) != n:
        raise CCoEArtefactError(
            f"{what}: has {num_layers(m.model)} decoder layers, the base {b.ref or b.name} has {n}"
        )
    if layers > n:
        raise CollabError(
            f"--layers: the base has {n} decoder layers; expected 1 <= --layers <= {n}, found {layers}"
        )
    depth = n - layers
    prefix = layers_prefix(b.model)
    ours, theirs = b.model.state_dict(), m.model.state_dict()
    for key in [
        *ours,
        *(k for k in theirs if k not in ours),
    ]:  # the model's own order: embeddings first
        if key not in theirs:
            raise CCoEArtefactError(
                f"{what}: tensor {key} of the base is missing; not a fine-tune of {b.ref or b.name}"
            )
        if key not in ours:
            raise CCoEArtefactError(
                f"{what}: tensor {key} is not in the base {b.ref or b.name}; not a fine-tune of it"
            )
        a, c = ours[key], theirs[key]
        if tuple(a.shape) != tuple(c.shape):
            raise CCoEArtefactError(
                f"{what}: {key} has shape {tuple(c.shape)}, the base's has {tuple(a.shape)}"
            )
        if not is_branch_key(key, prefix, depth) and not torch.equal(
            a.float(), c.float()
        ):
            diff = float((a.float() - c.float()).abs().max())
            raise CCoEArtefactError(
                f"{what}: {key} differs from the base's (max |difference| {diff:.3g}); with --layers {layers} only layers {depth}..{n - 1} "
                f"may differ: the backbone (embeddings, layers below {depth}, final norm, head) must be the base's exactly"
            )
    tensors = {k: v for k, v in theirs.items() if is_branch_key(k, prefix, depth)}
    text = b.model.config.get_text_config()
    config = CCoEConfig(
        name=name or Path(what).name.removeprefix("zoo:"),
        base=b.ref or b.name,
        depth=depth,
        layers=layers,
        num_hidden_layers=n,
        backbone_sha256=backbone_fingerprint(b.model, depth),
        hidden_size=int(text.hidden_size),
        model_type=str(text.model_type),
        layers_prefix=prefix,
        training={"pushed_from": what},
    )
    from collab.io import atomic_directory

    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_expert(tmp, tensors, config)
    return out


__all__ = ["CCoEArtefactError", "pop_expert", "push_expert"]
