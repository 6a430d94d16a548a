"""Lean tensor I/O and a lean merge loop for collab's own methods.

mergekit reads inputs through memory-mapped ``safe_open`` handles: every page
it touches stays in the process's resident set until the handle closes, so a
merge of three 540 MB models peaks at all of them. Here each tensor is read
explicitly (``os.preadv`` at the offset the safetensors header gives) into
fresh memory that is freed when the tensor is, and the output is written
tensor by tensor at offsets computed up front from the inputs' headers, so
neither the inputs nor the output shard are ever held whole.

``run_lean`` merges the simple configs (``models:`` with scalar parameters,
plus a ``base_model`` for task-vector methods) of mergekit's ``linear`` and
``task_arithmetic`` and of collab's ``ties_fast`` without mergekit's planner
and executor (and without importing mergekit or transformers); the kernels
repeat mergekit's arithmetic operation for operation, so the output is the
same bit for bit. Anything else (slices, gradients, filters, tokenizer rules,
other methods) goes through mergekit's ``run_merge``. ``explicit_reads`` gives mergekit's
own loader the same explicit reader.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from merging.errors import MergeError

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _torch_dtype(code: str) -> Any:
    import torch

    try:
        return getattr(torch, _DTYPES[code])
    except KeyError:
        raise MergeError(f"safetensors dtype {code!r} is not supported") from None


def _st_code(dtype: Any) -> str:
    return _NAMES[str(dtype).removeprefix("torch.")]


class SafetensorsReader:
    """One safetensors file; ``get_tensor`` reads a tensor's bytes with ``preadv``
    into new memory (no memory map, so nothing stays resident once freed).
    Also serves as mergekit's ``TensorLoader`` (``get_tensor``, ``keys``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            n = int.from_bytes(os.pread(self.fd, 8, 0), "little")
            header = json.loads(os.pread(self.fd, n, 8))
        except (OSError, ValueError) as e:
            os.close(self.fd)
            raise MergeError(f"{self.path}: not a valid safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict[str, Any]] = header
        self.data_start = 8 + n

    def keys(self) -> Any:
        return self.header.keys()

    def nbytes(self, name: str) -> int:
        a, b = self.header[name]["data_offsets"]
        return b - a

    def get_tensor(self, name: str) -> Any:
        import torch

        info = self.header[name]
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done, offset = 0, self.data_start + start
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise MergeError(f"{self.path}: file ends inside tensor '{name}'")
            done += got
        return buf.view(_torch_dtype(info["dtype"])).reshape(info["shape"])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class ModelReader:
    """All safetensors shards of a model directory, read tensor by tensor."""

    def __init__(self, model_dir: Path) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise MergeError(f"{model_dir}: no *.safetensors files")
        self.files = [SafetensorsReader(f) for f in files]
        self.where: dict[str, SafetensorsReader] = {}
        for f in self.files:
            for k in f.keys():
                self.where[k] = f

    def names(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> dict[str, Any]:
        return self.where[name].header[name]

    def nbytes(self, name: str) -> int:
        return self.where[name].nbytes(name)

    def get(self, name: str) -> Any:
        return self.where[name].get_tensor(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


class StreamingShardWriter:
    """Writes a safetensors model whose tensors (names, dtypes, shapes) are known
    up front: the headers are written first, then each tensor at its offset as it
    is computed, so no shard is held in memory. Shards hold at most ``shard_size``
    parameters; one shard is ``model.safetensors``, several are
    ``model-0000k-of-0000n.safetensors`` with an index."""

    def __init__(self, out: Path, entries: list[tuple[str, Any, tuple[int, ...]]], shard_size: int) -> None:
        import math

        groups: list[list[tuple[str, Any, tuple[int, ...]]]] = [[]]
        count = 0
        for e in entries:
            n = math.prod(e[2])
            if groups[-1] and count + n > shard_size:
                groups.append([])
                count = 0
            groups[-1].append(e)
            count += n
        self.out = out
        self.slots: dict[str, tuple[int, int, int, Any]] = {}  # name -> (fd, offset, nbytes, dtype)
        self.fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        k = len(groups)
        for i, group in enumerate(groups, 1):
            fname = "model.safetensors" if k == 1 else f"model-{i:05d}-of-{k:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape in group:
                nbytes = math.prod(shape) * _element_size(dtype)
                header[name] = {"dtype": _st_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            fd = os.open(out / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, len(text).to_bytes(8, "little") + text, 0)
            os.ftruncate(fd, 8 + len(text) + offset)
            start = 8 + len(text)
            for name, dtype, _shape in group:
                a, b = header[name]["data_offsets"]
                self.slots[name] = (fd, start + a, b - a, dtype)
                self.weight_map[name] = fname
            self.total += offset

    def write(self, name: str, tensor: Any) -> None:
        fd, offset, nbytes, dtype = self.slots.pop(name)
        t = tensor.to(dtype).contiguous().reshape(-1).view(__import__("torch").uint8)
        if t.numel() != nbytes:
            raise MergeError(f"tensor '{name}': {t.numel()} bytes computed but {nbytes} planned")
        view = memoryview(t.numpy())
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, view[done:], offset + done)

    def close(self) -> None:
        if self.slots:
            raise MergeError(f"{len(self.slots)} tensors were not written (e.g. '{next(iter(self.slots))}')")
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        files = set(self.weight_map.values())
        if len(files) > 1:
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2) + "\n"
            )

    def abort(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _element_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


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


# ---------------------------------------------------------------- lean merges

#: Top-level config keys a lean merge understands; any other key sends the merge
#: through mergekit's planner.
_LEAN_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, bool)) and not isinstance(v, str)


def supports(plan: Any) -> bool:
    """Whether ``plan`` can run on the lean loop: a method with a lean kernel,
    ``models:`` given by path (with a ``base_model`` for a task-vector method,
    without one for ``linear``), scalar parameters only, and no tokenizer rule
    beyond the first model's (or the base's) tokenizer."""
    raw = plan.raw
    lean = LEAN_KERNELS.get(plan.method.name)
    if lean is None or plan.method.engine != "mergekit":
        return False
    if not set(raw) <= _LEAN_KEYS or raw.get("tokenizer_source") not in (None, "base"):
        return False
    if not isinstance(raw.get("models"), list) or not raw["models"]:
        return False
    if isinstance(raw.get("base_model"), str) != lean.uses_base or (not lean.uses_base and raw.get("base_model") is not None):
        return False
    if raw.get("dtype") not in (None, "float32", "bfloat16", "float16") or raw.get("out_dtype") not in (None, "float32", "bfloat16", "float16"):
        return False
    scopes = [raw.get("parameters") or {}] + [m.get("parameters") or {} for m in raw["models"] if isinstance(m, dict)]
    if len(scopes) != len(raw["models"]) + 1:
        return False
    for m in raw["models"]:
        if not isinstance(m.get("model"), str) or set(m) - {"model", "parameters"}:
            return False
    return all(isinstance(s, dict) and all(_scalar(v) for v in s.values()) for s in scopes)


def run_lean(plan: Any, out: Path, *, progress: Any, shard_size: int) -> int:
    """Merge ``plan`` (``supports(plan)`` is true) into ``out``: tensors are read
    explicitly, merged by the method's kernel and written at precomputed
    offsets; the next tensor's inputs are read while the current one merges and
    the previous one is written."""
    import torch

    from merging.datamerge import _copy_tokenizer, _write_config

    raw = plan.raw
    lean = LEAN_KERNELS[plan.method.name]
    base_ref = raw.get("base_model") if lean.uses_base else None
    shared = {p.name: p.default for p in plan.method.params if not p.required}
    shared.update(raw.get("parameters") or {})
    entries = []
    for i, m in enumerate(raw["models"]):
        if m["model"] == base_ref:
            continue
        params = {**shared, **(m.get("parameters") or {})}
        for p in plan.method.params:
            if p.per_model and p.name not in params:
                raise MergeError(f"models[{i}] ({m['model']}): parameter {p.name!r} is required by method '{plan.method.name}' and not set")
        entries.append((plan.inputs[m["model"]].path, params))
    readers = [ModelReader(d) for d, _ in entries]
    params = [p for _, p in entries]
    # The model that gives names, shapes, config and tokenizer: the base, or the first model (as mergekit does).
    base_dir = plan.inputs[base_ref].path if base_ref is not None else entries[0][0]
    base = ModelReader(base_dir) if base_ref is not None else readers[0]
    compute = getattr(torch, raw["dtype"]) if raw.get("dtype") else None
    out_name = raw.get("out_dtype") or raw.get("dtype")
    names = base.names()
    plan_entries = []
    for name in names:
        info = base.info(name)
        dt = getattr(torch, out_name) if out_name else _torch_dtype(info["dtype"])
        if not torch.empty((), dtype=_torch_dtype(info["dtype"])).is_floating_point():
            dt = _torch_dtype(info["dtype"])
        plan_entries.append((name, dt, tuple(info["shape"])))
    writer = StreamingShardWriter(out, plan_entries, shard_size)
    advance = progress.start("merging tensors", len(names))

    def load(name: str) -> tuple[Any, list[Any]]:
        def cast(t: Any) -> Any:
            return t.to(compute) if compute is not None and t.is_floating_point() else t

        ts = [cast(r.get(name)) for r in readers]
        return (cast(base.get(name)) if base_ref is not None else None), ts

    own = [base] if base_ref is not None else []
    group_bytes = {n: sum(r.nbytes(n) for r in own + readers) for n in names}
    prefetch_limit = 256 * 2**20  # bytes of inputs read ahead
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="collab-merge-io")
    try:
        pending_write: Future[None] | None = None
        nxt: Future[tuple[Any, list[Any]]] | None = pool.submit(load, names[0]) if names else None
        for i, name in enumerate(names):
            assert nxt is not None
            b, ts = nxt.result()
            nxt = None
            if i + 1 < len(names):
                if group_bytes[names[i + 1]] <= prefetch_limit:
                    nxt = pool.submit(load, names[i + 1])
            first = b if b is not None else ts[0]
            merged = lean.kernel(b, ts, params) if first.is_floating_point() else first
            del b, ts, first
            if pending_write is not None:
                pending_write.result()
            pending_write = pool.submit(writer.write, name, merged)
            del merged
            advance(1)
            if nxt is None and i + 1 < len(names):
                nxt = _done(load(names[i + 1]))
        if pending_write is not None:
            pending_write.result()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for r in own + readers:
            r.close()
    _write_config(plan, base_dir, out, out_name or _config_dtype(base_dir))
    _copy_tokenizer(plan, base_dir, out)
    return len(names)


def _done(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def _config_dtype(model_dir: Path) -> str:
    from merging.inputs import read_config

    cfg = read_config(model_dir)
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


@dataclass(frozen=True)
class LeanKernel:
    """``kernel(base, [tensor per model], [parameters per model]) -> merged``; the
    tensors are fresh copies the kernel may overwrite. ``base`` is None for a
    method without a base model (``uses_base`` false)."""

    kernel: Callable[[Any, list[Any], list[dict[str, Any]]], Any]
    uses_base: bool


def _linear(base: Any, tensors: list[Any], params: list[dict[str, Any]]) -> Any:
    """mergekit's ``linear`` (``merge_methods/linear.py``), same operations in the
    same order: a float32 (float64 for float64 inputs) weighted sum, divided by
    the sum of the weights when ``normalize``."""
    import torch

    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([[float(p["weight"]) for p in params]], dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape((1,) * tensor.ndim))
    if bool(params[0].get("normalize", True)):
        result.div_(weight.sum(dim=1).reshape((1,) * first.ndim))
    return result.to(first.dtype)


def _task_arithmetic(base: Any, tensors: list[Any], params: list[dict[str, Any]]) -> Any:
    """mergekit's ``task_arithmetic`` (generalized task arithmetic without
    sparsification or sign consensus): the weighted task vectors summed over the
    models, as ``stack(...).sum(dim=0)`` does, without the stacked copy."""
    import torch

    if not tensors:
        return base
    weights = torch.tensor([float(p["weight"]) for p in params], dtype=base.dtype)
    deltas = [t.sub_(base).mul_(w) for t, w in zip(tensors, weights.unbind(0))]
    if len(deltas) <= 4:
        # torch's sum over dim 0 adds up to four rows in order (it keeps four
        # accumulators); beyond that only the stacked sum gives its rounding.
        mixed = torch.zeros_like(base)
        for d in deltas:
            mixed += d
    else:
        mixed = torch.stack(deltas).sum(dim=0)
    del deltas
    p0 = params[0]
    if bool(p0.get("normalize", False)):
        divisor = weights.sum(dim=0)
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
        mixed /= divisor
    lam = p0.get("lambda", 1.0)
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


#: method name -> its lean kernel (``ties_fast`` registers itself in merging.fast_ties).
LEAN_KERNELS: dict[str, LeanKernel] = {
    "linear": LeanKernel(_linear, uses_base=False),
    "task_arithmetic": LeanKernel(_task_arithmetic, uses_base=True),
}
