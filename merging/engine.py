"""collab's merge engine: one streaming loop for every method.

For each output tensor of the plan (``merging.layout``), in the order mergekit
runs them: read its input tensors (``merging.tensorio``, explicit reads),
cast them to the config's ``dtype``, merge them with the method's kernel
(mergekit's own for mergekit's methods, see ``merging.mergekit_methods``),
cast to ``out_dtype`` and append the result to its output shard. The next
tensor's inputs are read on a worker thread while the current one merges and
the previous one is written, so memory holds a few tensors per input, never a
model or a shard. Data-aware methods run their ``prepare`` step (statistics
over whole models, one model at a time) before the loop.

``merge_state_dicts`` runs the same plan and kernels on tensors held in
memory, for the coefficient search.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from merging.config import MergePlan
from merging.errors import MergeError
from merging.layout import Layout, TensorJob, layout, model_dirs
from merging.methods import Kernel, MethodInfo, PrepareContext, TensorGroup
from merging.tensorio import (
    ModelReader,
    StreamingShardWriter,
    read_config,
    write_side_files,
)

#: Bytes of input tensors read ahead of the tensor being merged.
PREFETCH_BYTES = 256 * 2**20


class Reader(Protocol):
    """What the engine reads a model through (``ModelReader``, or tensors in memory)."""

    def names(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def nbytes(self, name: str) -> int: ...
    def get(self, name: str) -> Any: ...


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch as ``mergekit-yaml --random-seed`` does
    (``transformers.trainer_utils.set_seed``), without importing transformers."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _action(method: MethodInfo, job: TensorJob) -> str:
    """mergekit's handling of an optional tensor only some inputs have:
    ``merge``, ``passthrough`` (the one input as is) or ``skip``."""
    present = [r for r, n in job.inputs if n is not None]
    if not job.optional or len(present) == len(job.inputs):
        return "merge"
    single_base = len(present) == 1 and present[0] == job.base
    policy = method.optional_tensors
    if len(present) == 1 and (policy == "passthrough_singleton" or (policy == "passthrough_base_singleton" and single_base)):
        return "passthrough"
    if policy == "base_or_skip" and len(present) < method.min_inputs:
        return "passthrough" if single_base else "skip"
    return "merge"


class _Runner:
    """Merges one tensor job: load, cast, kernel, cast."""

    def __init__(self, plan: MergePlan, readers: dict[str, Reader], kernel: Kernel) -> None:
        self.plan = plan
        self.readers = readers
        self.kernel = kernel

    def load(self, job: TensorJob, clone: bool = False) -> list[tuple[str, Any]]:
        import torch

        out = []
        for ref, name in job.inputs:
            if name is None:
                continue
            t = self.readers[ref].get(name)
            if job.load_dtype is not None and t.dtype != (dt := getattr(torch, job.load_dtype)):
                t = t.to(dt)
            elif clone:
                t = t.clone()
            out.append((ref, t))
        return out

    def merge(self, job: TensorJob, loaded: list[tuple[str, Any]]) -> Any:
        import torch

        action = _action(self.plan.method, job)
        if action == "passthrough":
            result = loaded[0][1]
        else:
            self.plan.method.check_inputs([r for r, _ in loaded], job.base, f"tensor '{job.name}'")
            tensors = [t for _, t in loaded]
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) > 1:
                raise MergeError(f"tensor '{job.name}': the inputs' shapes differ: " + ", ".join(f"{r} {list(t.shape)}" for r, t in loaded))
            if not all(t.is_floating_point() for t in tensors):
                result = _buffer(job.name, loaded)
            else:
                dtype = tensors[0].dtype
                for t in tensors[1:]:
                    dtype = torch.promote_types(dtype, t.dtype)
                refs = tuple(r for r, _ in loaded)
                group = TensorGroup(
                    job.name,
                    refs,
                    tuple(t.to(dtype) for t in tensors),
                    refs.index(job.base) if job.base in refs else None,
                )
                del tensors
                loaded.clear()
                params = {k: ({r: v[r] for r in refs if r in v} if isinstance(v, dict) else v) for k, v in job.params.items()}
                try:
                    result = self.kernel(group, params)
                except (ValueError, TypeError) as e:  # mergekit's kernels reject inputs and parameters with these
                    raise MergeError(f"tensor '{job.name}': method '{self.plan.method.name}' failed: {e}") from e
        if job.out_dtype is not None:
            result = result.to(getattr(torch, job.out_dtype))
        return result


def _buffer(name: str, loaded: list[tuple[str, Any]]) -> Any:
    """A non-floating tensor (a buffer) is copied when every input agrees, as mergekit does."""
    import torch

    first = loaded[0][1]
    for ref, t in loaded[1:]:
        if t.dtype != first.dtype or not torch.equal(t, first):
            raise MergeError(f"tensor '{name}': non-floating tensor differs between '{loaded[0][0]}' and '{ref}'; it cannot be merged")
    return first.clone()


def _kernel(plan: MergePlan, lay: Layout, readers: dict[str, Reader], *, workdir: Path, progress: Any) -> Kernel:
    m = plan.method
    if m.kernel is not None:
        return m.kernel
    assert m.prepare is not None, m.name
    refs = [e.ref for e in plan.models]
    weights = [float(w) for w in plan.model_values("weight")]
    total = sum(weights)
    if total <= 0:
        raise MergeError(f"models[*].parameters.weight: the weights must sum to a positive number, found {weights}")
    ctx = PrepareContext(
        refs=refs,
        dirs=[plan.inputs[r].path for r in refs],
        params=plan.shared_values(),
        weights=[w / total for w in weights],
        names=[j.name for j in lay.jobs],
        config_dir=plan.config_dir,
        workdir=workdir,
        progress=progress,
    )
    kernel = m.prepare(ctx)
    _release_free_memory()  # the statistics' passes leave freed pages in the C heap
    return kernel


def _release_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc keeps freed
    small blocks in its heap, which would stay in the resident set)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check(plan: MergePlan) -> None:
    """Lay out ``plan`` (every output tensor, its inputs and parameters) without
    merging: the dry run's last check. Configs the engine does not run are left
    to mergekit's own checks."""
    from merging.layout import unsupported

    if unsupported(plan) is not None:
        return
    readers: dict[str, Reader] = {r: ModelReader(d) for r, d in model_dirs(plan).items()}
    try:
        layout(plan, readers)
    finally:
        for r in readers.values():
            r.close()  # type: ignore[attr-defined]


def run(plan: MergePlan, out: Path, *, progress: Any, seed: int | None, shard_size: int, workdir: Path) -> int:
    """Merge ``plan`` into the directory ``out``; returns the number of tensors written."""
    readers: dict[str, Reader] = {r: ModelReader(d) for r, d in model_dirs(plan).items()}
    try:
        lay = layout(plan, readers)
        kernel = _kernel(plan, lay, readers, workdir=workdir, progress=progress)
        jobs = [j for j in lay.jobs if _action(plan.method, j) != "skip"]
        n = _stream(_Runner(plan, readers, kernel), jobs, out, progress=progress, seed=seed, shard_size=shard_size)
    finally:
        for r in readers.values():
            r.close()  # type: ignore[attr-defined]
    donor = plan.inputs[lay.donor].path
    cfg = read_config(donor)
    write_side_files(donor, out, plan.out_dtype or plan.dtype or cfg.get("dtype") or cfg.get("torch_dtype"), lay.config_updates)
    return n


def _stream(runner: _Runner, jobs: list[TensorJob], out: Path, *, progress: Any, seed: int | None, shard_size: int) -> int:
    readers = runner.readers

    def shape(job: TensorJob) -> tuple[int, ...]:
        ref, name = next((r, n) for r, n in job.inputs if n is not None)
        return readers[ref].shape(name)

    def nbytes(job: TensorJob) -> int:
        return sum(readers[r].nbytes(n) for r, n in job.inputs if n is not None)

    writer = StreamingShardWriter(out, [(j.name, shape(j)) for j in jobs], shard_size)
    advance = progress.start("merging tensors", len(jobs))
    if seed is not None:
        seed_everything(seed)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="collab-merge-io")
    try:
        pending_write: Future[None] | None = None
        nxt: Future[list[tuple[str, Any]]] | None = pool.submit(runner.load, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            assert nxt is not None
            loaded = nxt.result()
            nxt = None
            if i + 1 < len(jobs) and nbytes(jobs[i + 1]) <= PREFETCH_BYTES:
                nxt = pool.submit(runner.load, jobs[i + 1])
            merged = runner.merge(job, loaded)
            del loaded
            if pending_write is not None:
                pending_write.result()
            pending_write = pool.submit(writer.write, job.name, merged)
            del merged
            advance(1)
            if nxt is None and i + 1 < len(jobs):
                nxt = _done(runner.load(jobs[i + 1]))
        if pending_write is not None:
            pending_write.result()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return len(jobs)


def _done(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


class StateReader:
    """A model held in memory (name -> tensor), read like a ``ModelReader``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def has(self, name: str) -> bool:
        return name in self.state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def nbytes(self, name: str) -> int:
        t = self.state[name]
        return t.numel() * t.element_size()

    def get(self, name: str) -> Any:
        return self.state[name]

    def close(self) -> None:
        pass


def merge_state_dicts(plan: MergePlan, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``plan`` merged from models held in memory (``{ref: {name: tensor}}``,
    every model the plan merges), with the same tensor plan and kernels as
    ``run``; the inputs are not modified. Methods with a ``prepare`` step are
    not supported."""
    m = plan.method
    if m.kernel is None:
        raise MergeError(f"method '{m.name}' needs statistics over whole models; it cannot merge in memory")
    readers: dict[str, Reader] = {r: StateReader(s) for r, s in states.items()}
    lay = layout(plan, readers)
    runner = _Runner(plan, readers, m.memory_kernel or m.kernel)
    clone = m.inplace and m.memory_kernel is None
    return {j.name: runner.merge(j, runner.load(j, clone=clone)) for j in lay.jobs if _action(m, j) != "skip"}
