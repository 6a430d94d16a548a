"""The configs collab's engine does not lay out, run through mergekit's own
``run_merge``: ``modules:``, tokenizer rules (``tokenizer_source``,
``tokenizer:``) and ``chat_template`` (which build a tokenizer with
transformers and re-index the embeddings), multi-module architectures, and
slices of architectures mergekit has no definition of
(``merging.layout.unsupported`` says which). mergekit still reads each tensor
through collab's explicit reader, and reports progress to collab's bar.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from merging.config import MergePlan
from merging.errors import MergeError
from merging.tensorio import SafetensorsReader, safetensors_files


@contextlib.contextmanager
def explicit_reads() -> Iterator[None]:
    """While active, mergekit opens safetensors shards with ``SafetensorsReader``
    instead of a memory-mapped ``safe_open`` (same bytes, so the same output)."""
    from mergekit.io import loader

    original = loader.TensorLoader.__dict__["get"]

    def get(cls: Any, shard_path: str, use_lazy_unpickle: bool = False, device: str | None = None) -> Any:
        if shard_path.lower().endswith(".safetensors"):
            return SafetensorsReader(shard_path)
        return original.__func__(cls, shard_path, use_lazy_unpickle=use_lazy_unpickle, device=device)

    loader.TensorLoader.get = classmethod(get)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        loader.TensorLoader.get = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _rich_executor(progress: Any) -> Iterator[None]:
    """mergekit has no progress hook, only a tqdm bar inside ``Executor.run``;
    swap in a subclass that reports each written tensor to the rich bar while
    ``run_merge`` runs."""
    import mergekit.merge as mk_merge

    original = mk_merge.Executor

    class _ReportingExecutor(original):  # type: ignore[misc, valid-type]
        def run(self, quiet: bool = False, desc: str | None = None) -> Iterator[Any]:
            advance = progress.start("merging tensors", len(self.targets))
            for task, value in super().run(quiet=True, desc=desc):
                advance(1)
                yield task, value

    mk_merge.Executor = _ReportingExecutor
    try:
        yield
    finally:
        mk_merge.Executor = original


def _ensure_registered(plan: MergePlan) -> None:
    """Put a collab method with a mergekit implementation (``ties_fast``) into
    mergekit's registry, once per process, so that ``run_merge`` can plan it."""
    from mergekit import merge_methods

    factory = plan.method.mergekit_factory
    if plan.method.source == "mergekit" or any(m.spec.name == plan.method.name for m in merge_methods.registered_methods()):
        return
    if factory is None:
        raise MergeError(f"method '{plan.method.name}' runs on collab's engine only, which does not support this config")
    merge_methods.register(factory())


def run(plan: MergePlan, out: Path, *, seed: int | None, progress: Any, workdir: Path, shard_size: int) -> int:
    """Run ``plan`` with mergekit's ``run_merge`` into ``out``; returns the number of tensors written."""
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    _ensure_registered(plan)
    options = MergeOptions(
        copy_tokenizer=True,
        write_model_card=False,  # collab writes its own (mergekit's asks the Hub)
        quiet=True,
        random_seed=seed,
        out_shard_size=shard_size,
        lora_merge_cache=str(workdir / "mergekit-lora"),
        safe_serialization=True,
        trust_remote_code=False,
    )
    config = plan.mergekit_config()
    with _rich_executor(progress), explicit_reads():
        try:
            run_merge(copy.deepcopy(config), str(out), options=options)
        except (RuntimeError, ValueError, TypeError) as e:
            raise MergeError(f"{plan.source_path or 'config'}: mergekit could not run this merge: {e}") from e
    n = 0
    for shard in safetensors_files(out):
        with SafetensorsReader(shard) as f:
            n += len(f.keys())
    return n
