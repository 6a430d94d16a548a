"""The merge engine's tensor I/O: one reader and one sharded writer.

Reading: each tensor is read explicitly (``os.preadv`` at the offset the
safetensors header gives) into fresh memory that is freed with the tensor. A
memory map would be simpler, but every page a merge touches would stay in the
resident set until the file closes, so merging four models would hold all
four. Writing: each tensor is appended to its shard as soon as it is computed
and the shard's header is written last into space reserved for it, so no
shard is held in memory and the output dtypes need not be known in advance
(some kernels return float32 for half-precision inputs). The engine writes
into a temporary directory that the runner renames into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Self

from collab.io import TOKENIZER_FILES
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
_CODES = {v: k for k, v in _DTYPES.items()}

#: Files copied from the donor model (the base, else the first model) beside the weights.
SIDE_FILES = ("generation_config.json", *TOKENIZER_FILES)


def torch_dtype(code: str) -> Any:
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    try:
        return getattr(torch, _DTYPES[code])
    except KeyError:
        raise MergeError(f"safetensors dtype {code!r} is not supported; expected one of {', '.join(_DTYPES)}") from None


def _code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    try:
        return _CODES[name]
    except KeyError:
        raise MergeError(f"dtype {name} cannot be written to safetensors; expected one of {', '.join(_CODES)}") from None


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
        return buf.view(torch_dtype(info["dtype"])).reshape(info["shape"])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model directory, sorted by name."""
    return sorted(Path(model_dir).glob("*.safetensors"))


class ModelReader:
    """All safetensors shards of a model directory, read tensor by tensor."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        files = safetensors_files(self.dir)
        if not files:
            raise MergeError(f"{model_dir}: no *.safetensors files")
        self.files = [SafetensorsReader(f) for f in files]
        self.where: dict[str, SafetensorsReader] = {}
        for f in self.files:
            for k in f.header:
                self.where[k] = f

    def names(self) -> list[str]:
        return list(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].header[name]["shape"])

    def dtype(self, name: str) -> Any:
        return torch_dtype(self.where[name].header[name]["dtype"])

    def nbytes(self, name: str) -> int:
        return self.where[name].nbytes(name)

    def get(self, name: str) -> Any:
        try:
            reader = self.where[name]
        except KeyError:
            raise MergeError(f"{self.dir}: no tensor '{name}'") from None
        return reader.get_tensor(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


#: Header bytes reserved per tensor beyond its name: the longest dtype code,
#: a shape of up to eight 20-digit sizes and two 20-digit offsets, with JSON syntax.
_HEADER_SLACK = 320


class StreamingShardWriter:
    """Writes a safetensors model tensor by tensor. The names and shapes are
    known up front (they fix the shards: at most ``shard_size`` parameters
    each, in the given order); each tensor is appended to its shard when
    ``write`` is called, in any order and any dtype, and each shard's header
    is written by ``close`` into space reserved before the data. One shard is
    ``model.safetensors``; several are ``model-0000k-of-0000n.safetensors``
    with ``model.safetensors.index.json``."""

    def __init__(self, out: Path, entries: list[tuple[str, tuple[int, ...]]], shard_size: int) -> None:
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        count = 0
        for name, shape in entries:
            n = math.prod(shape)
            if groups[-1] and count + n > shard_size:
                groups.append([])
                count = 0
            groups[-1].append((name, tuple(shape)))
            count += n
        self.out = out
        k = len(groups)
        self.shard_of: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.files: list[str] = []
        self.fds: list[int] = []
        self.data_start: list[int] = []  # where each shard's data begins (after the reserved header)
        self.end: list[int] = []  # bytes of data written so far per shard
        self.headers: list[dict[str, Any]] = []
        for i, group in enumerate(groups):
            fname = "model.safetensors" if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors"
            reserve = 64 + sum(len(json.dumps(name)) + _HEADER_SLACK for name, _ in group)
            reserve += -reserve % 8
            self.files.append(fname)
            self.fds.append(os.open(out / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            self.data_start.append(8 + reserve)
            self.end.append(0)
            self.headers.append({"__metadata__": {"format": "pt"}})
            for name, shape in group:
                self.shard_of[name] = i
                self.shapes[name] = shape

    def write(self, name: str, tensor: Any) -> None:
        """Append ``tensor`` (contiguous or not, any dtype safetensors has) as ``name``."""
        import torch

        if name not in self.shard_of:
            raise MergeError(f"tensor '{name}' was not planned for this output or was already written")
        shape = self.shapes[name]
        if tuple(tensor.shape) != shape:
            raise MergeError(f"tensor '{name}': computed shape {list(tensor.shape)} but the plan has {list(shape)}")
        i = self.shard_of.pop(name)
        code = _code(tensor.dtype)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        view = memoryview(data.numpy())
        start = self.end[i]
        done, offset = 0, self.data_start[i] + start
        while done < len(view):
            done += os.pwrite(self.fds[i], view[done:], offset + done)
        self.end[i] = start + len(view)
        self.headers[i][name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, start + len(view)]}

    def close(self) -> None:
        """Write every shard's header (and the index when there are several)."""
        if self.shard_of:
            raise MergeError(f"{len(self.shard_of)} tensors were not written (e.g. '{next(iter(self.shard_of))}')")
        weight_map: dict[str, str] = {}
        total = 0
        for i, fd in enumerate(self.fds):
            text = json.dumps(self.headers[i], separators=(",", ":")).encode()
            room = self.data_start[i] - 8
            if len(text) > room:
                raise MergeError(f"{self.files[i]}: header of {len(text)} bytes exceeds the {room} reserved")
            os.pwrite(fd, room.to_bytes(8, "little") + text + b" " * (room - len(text)), 0)
            os.close(fd)
            weight_map.update({k: self.files[i] for k in self.headers[i] if k != "__metadata__"})
            total += self.end[i]
        self.fds = []
        if len(self.files) > 1:
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            )

    def abort(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def read_config(model_dir: Path) -> dict[str, Any]:
    """A model directory's ``config.json``."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except FileNotFoundError:
        raise MergeError(f"{model_dir}: config.json not found (expected a Hugging Face model directory)") from None


def write_side_files(donor: Path, out: Path, dtype_name: str | None, config_updates: dict[str, Any] | None = None) -> None:
    """The output's ``config.json`` (the donor's, with ``dtype`` set and any
    ``config_updates``, e.g. the layer count of a sliced merge) and the donor's
    generation config and tokenizer files."""
    cfg = read_config(donor)
    if dtype_name:
        cfg["dtype"] = dtype_name
        cfg.pop("torch_dtype", None)
    for key, value in (config_updates or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (donor / name).exists():
            shutil.copy2(donor / name, out / name)
