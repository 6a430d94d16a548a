"""What a merge method declares: its parameters, its base-model policy and the
streaming kernel that merges one tensor (``merging.registry`` holds them all).

A kernel receives one output tensor's inputs (``TensorGroup``) and the
parameters resolved for that tensor, and returns the merged tensor. The engine
(``merging.engine``) calls it once per tensor while reading and writing
tensor by tensor. Data-aware methods (``fisher``, ``regmean``,
``weight_matching``) have a ``prepare`` step instead, which computes their
statistics over whole models first and returns the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from merging.errors import MergeError

REQUIRED: Any = object()

#: Where a parameter is set: once for the merge (``shared``), per input model
#: (``input``), or per input model other than the base (``non_base``).
Scope = Literal["shared", "input", "non_base"]
#: What a method does with ``base_model``.
BasePolicy = Literal["required", "optional", "forbidden", "ignored"]


def _validator(kind: Any) -> Callable[[Any], Any]:
    from pydantic import TypeAdapter

    return TypeAdapter(kind).validate_python


@dataclass(frozen=True)
class Param:
    """A method parameter: its name, value type, scope and default."""

    name: str
    kind: Any = float
    default: Any = REQUIRED
    scope: Scope = "shared"
    doc: str = ""
    validate: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def per_model(self) -> bool:
        return self.scope != "shared"

    def check(self, value: Any) -> Any:
        """``value`` converted to the parameter's type (ValueError if it cannot be)."""
        validate = self.validate or _validator(self.kind)
        try:
            return validate(value)
        except Exception as e:  # pydantic's ValidationError, or the validator's own
            raise ValueError(f"expected {getattr(self.kind, '__name__', self.kind)}, found {value!r}") from e


@dataclass(frozen=True)
class TensorGroup:
    """The inputs of one output tensor, in config order: ``refs[i]`` holds
    ``tensors[i]`` (fresh copies the kernel may overwrite); ``base`` is the
    index of the base model's tensor, or None."""

    name: str
    refs: tuple[str, ...]
    tensors: tuple[Any, ...]
    base: int | None = None


class Kernel(Protocol):
    """Merges one tensor: ``params`` maps each parameter to its value, or for
    per-model parameters to ``{model ref: value}``."""

    def __call__(self, group: TensorGroup, params: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class PrepareContext:
    """What a data-aware method's ``prepare`` gets: the input models (config
    order), the shared parameters, their per-model ``weight`` (normalised),
    the tensor names, the config's directory (for relative file names), a
    work directory deleted after the merge, and a progress reporter."""

    refs: list[str]
    dirs: list[Path]
    params: dict[str, Any]
    weights: list[float]
    names: list[str]
    config_dir: Path | None
    workdir: Path
    progress: Any


@dataclass(frozen=True)
class MethodInfo:
    """A merge method: name (the YAML ``merge_method``), where it comes from
    (``mergekit`` or ``collab``), its parameters and base policy, and either a
    streaming ``kernel`` or a data-aware ``prepare`` step. ``min_inputs``,
    ``max_inputs``, ``min_non_base`` and ``max_non_base`` bound the models of
    each output tensor (mergekit's ``InputContract``)."""

    name: str
    source: str
    params: tuple[Param, ...]
    base: BasePolicy
    kernel: Kernel | None = field(default=None, compare=False)
    prepare: Callable[[PrepareContext], Kernel] | None = field(default=None, compare=False)
    pretty_name: str = ""
    reference_url: str = ""
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    #: mergekit's handling of an optional tensor (e.g. an untied ``lm_head``) that only some inputs have.
    optional_tensors: str = "error"
    #: A mergekit ``MergeMethod`` for configs only mergekit's ``run_merge`` runs (see ``merging.mergekit_run``).
    mergekit_factory: Callable[[], Any] | None = field(default=None, compare=False)
    #: Whole-model methods take ``models:`` only (no slices, gradients or filters).
    whole_model: bool = False
    #: The kernel overwrites its input tensors (the engine reads fresh copies for it).
    inplace: bool = False
    #: The same kernel for tensors held in memory, which it must leave alone (the
    #: search's candidates); None: ``kernel``, given copies when it works in place.
    memory_kernel: Kernel | None = field(default=None, compare=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check_inputs(self, refs: list[str], base: str | None, where: str) -> None:
        """MergeError unless ``refs`` (with ``base`` among them or None) meet the method's contract."""
        has_base = base is not None and base in refs and self.base != "ignored"
        if self.base == "required" and not has_base:
            raise MergeError(f"{where}: method '{self.name}' needs a base model; add 'base_model: <the model the others were fine-tuned from>'")
        if self.base == "forbidden" and has_base:
            raise MergeError(f"{where}: method '{self.name}' takes no base model; remove 'base_model'")
        for what, n, lo, hi in (
            ("models", len(refs), self.min_inputs, self.max_inputs),
            ("models besides the base", len(refs) - int(has_base), self.min_non_base, self.max_non_base),
        ):
            if lo is not None and n < lo:
                raise MergeError(f"{where}: method '{self.name}' needs at least {lo} {what}, found {n}")
            if hi is not None and n > hi:
                raise MergeError(f"{where}: method '{self.name}' takes at most {hi} {what}, found {n}")
