"""Turn model references in a merge config into local safetensors directories.

mergekit reads Hugging Face directories only; collab also takes ``zoo:NAME``,
``.gguf`` files (de-quantised once through collab's cache), PEFT LoRA adapter
directories and mergekit's ``base+lora`` syntax (merged into their base in a
temporary directory), and ``.bin`` pickles only when the user allows them
(converted to safetensors with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from merging.errors import MergeError
from merging.tensorio import SIDE_FILES, SafetensorsReader, safetensors_files

#: Files copied along with weights when an input is rewritten into a work directory.
_SIDE_FILES = ("config.json", *SIDE_FILES)


@dataclass
class ResolvedInput:
    """One model reference of the config and the local directory that holds it."""

    ref: str
    path: Path  # may lie in the merge's work directory, deleted when it ends
    kind: str  # "hf", "gguf", "lora", "pickle"
    notes: list[str] = field(default_factory=list)  # for the model card: no machine paths


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a safetensors model directory, read from
    the file headers only (no tensor data is loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in safetensors_files(model_dir):
        with SafetensorsReader(f) as reader:
            shapes.update((name, tuple(info["shape"])) for name, info in reader.header.items())
    return shapes


def _key(*parts: str) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


class InputResolver:
    """Resolves references once each; derived directories go to ``workdir``
    (removed by the caller when the merge ends)."""

    def __init__(self, workdir: Path, *, search_dirs: list[Path], allow_pickle: bool = False, dry_run: bool = False) -> None:
        self.workdir = workdir
        self.search_dirs = search_dirs
        self.allow_pickle = allow_pickle
        self.dry_run = dry_run
        self.resolved: dict[str, ResolvedInput] = {}

    def __call__(self, ref: str, where: str) -> ResolvedInput:
        if ref not in self.resolved:
            self.resolved[ref] = self._resolve(ref, where)
        return self.resolved[ref]

    # ------------------------------------------------------------------ helpers
    def _local(self, ref: str, where: str) -> Path:
        p = Path(ref).expanduser()
        if p.is_absolute():
            if p.exists():
                return p
        else:
            for d in self.search_dirs:
                if (d / p).exists():
                    return (d / p).resolve()
        if "@" in ref:
            raise MergeError(f"{where}: '{ref}' looks like a Hub model with a revision; collab merges offline, give a local directory")
        looked = ", ".join(str(d) for d in self.search_dirs) if not p.is_absolute() else str(p)
        raise MergeError(
            f"{where}: model '{ref}' not found (looked in {looked}); expected a local Hugging Face directory, "
            "a .gguf file, a LoRA adapter directory or zoo:NAME (collab merges offline, Hub ids are not downloaded)"
        )

    def _resolve(self, ref: str, where: str) -> ResolvedInput:
        from collab.errors import ModelLoadError
        from collab.experts import dequantised_dir, resolve_ref

        if "+" in ref and not ref.startswith("zoo:"):
            base_ref, lora_ref = ref.split("+", 1)
            base = self(base_ref, where)
            adapter = self._local(lora_ref, where)
            return self._merge_lora(ref, base.path, adapter, where, f"LoRA adapter '{lora_ref}' merged into '{base_ref}'")
        target = ref if ref.startswith("zoo:") else str(self._local(ref, where))
        try:
            res = resolve_ref(target)
        except ModelLoadError as e:
            raise MergeError(f"{where}: {e}") from None
        notes: list[str] = []
        if res.gguf_file:
            # De-quantising is cached and needed to read shapes, so dry runs do it too.
            base_dir = dequantised_dir(res)
            kind = "gguf"
            notes.append(f"de-quantised from {res.gguf_file}")
        else:
            base_dir = res.path
            kind = "hf"
        if res.adapter is not None:
            base_ref = _adapter_base(res.adapter)
            note = f"LoRA adapter merged into its base '{base_ref}'" if base_ref else "LoRA adapter merged into its base"
            return self._merge_lora(ref, base_dir, res.adapter, where, "; ".join([note] + notes))
        return self._check_weights(ResolvedInput(ref=ref, path=base_dir.resolve(), kind=kind, notes=notes), where)

    def _check_weights(self, inp: ResolvedInput, where: str) -> ResolvedInput:
        if safetensors_files(inp.path):
            return inp
        bins = sorted(inp.path.glob("*.bin"))
        if not bins:
            raise MergeError(f"{where}: {inp.path} holds no weights (expected *.safetensors)")
        if not self.allow_pickle:
            raise MergeError(
                f"{where}: {inp.path} has pickled weights only ({bins[0].name}); loading pickles can run arbitrary code. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the files"
            )
        out = self.workdir / f"pickle-{_key(str(inp.path))}"
        if not out.exists():
            import torch
            from safetensors.torch import save_file

            tmp = out.with_name(out.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            weight_map: dict[str, str] = {}
            for i, b in enumerate(bins):
                sd = torch.load(b, map_location="cpu", weights_only=True)
                shard = "model.safetensors" if len(bins) == 1 else f"model-{i + 1:05d}-of-{len(bins):05d}.safetensors"
                save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / shard), metadata={"format": "pt"})
                weight_map.update({k: shard for k in sd})
            if len(bins) > 1:
                (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            _copy_side_files(inp.path, tmp)
            os.replace(tmp, out)
        return ResolvedInput(ref=inp.ref, path=out, kind="pickle", notes=inp.notes + [f"converted from {bins[0].name} (--allow-pickle)"])

    def _merge_lora(self, ref: str, base_dir: Path, adapter: Path, where: str, note: str) -> ResolvedInput:
        if not (adapter / "adapter_config.json").exists():
            raise MergeError(f"{where}: {adapter} is not a LoRA adapter (adapter_config.json not found)")
        if not (adapter / "adapter_model.safetensors").exists():
            raise MergeError(f"{where}: {adapter}/adapter_model.safetensors not found (pickled adapters are not loaded)")
        out = self.workdir / f"lora-{_key(str(base_dir), str(adapter.resolve()))}"
        if self.dry_run:
            # Shapes of a merged LoRA equal its base's: validate against the base.
            return ResolvedInput(ref=ref, path=base_dir.resolve(), kind="lora", notes=[f"{note} (not merged in a dry run)"])
        if not out.exists():
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers' deprecated is_gradient_checkpointing
                model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
                model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            tmp = out.with_name(out.name + ".tmp")
            model.save_pretrained(str(tmp), safe_serialization=True)
            del model
            _copy_side_files(base_dir, tmp, skip=("config.json",))
            _copy_side_files(adapter, tmp, skip=("config.json", "generation_config.json"))
            os.replace(tmp, out)
        return ResolvedInput(ref=ref, path=out, kind="lora", notes=[note])


def _adapter_base(adapter: Path) -> str | None:
    """The base model a PEFT adapter names (``base_model_name_or_path``), as written."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None
    return str(base) if base else None


def _copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    for name in _SIDE_FILES:
        if name not in skip and (src / name).exists():
            shutil.copy2(src / name, dst / name)


#: A transformer layer index inside a tensor name ("model.layers.12.mlp...").
LAYER_RE = re.compile(r"\.(layers|h|blocks)\.\d+\.")


def layer_pattern(name: str) -> str:
    return LAYER_RE.sub(lambda m: f".{m.group(1)}.*.", name)
