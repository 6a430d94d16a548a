"""LoRA adapters of one base held unmerged, so a batch whose rows go to different
adapters runs as one batched forward per decoding step.

``Expert.load`` merges a PEFT LoRA adapter into its base, so three domain experts
on one base are three full models, and a batch routed over them decodes in one
pass per expert. An ``AdapterBank`` instead loads the base once and adds every
adapter to it unmerged (one ``peft.PeftModel`` with several named adapters):

- ``bank.expert(name)`` is an ``AdapterExpert``: an ``Expert`` (a System with
  ``generate``, ``stream``, ``generate_batch``, scoring, ``session``) that answers
  as that one adapter (or as the base itself), sharing the bank's weights and lock.
  It activates its adapter (``PeftModel.set_adapter``; the base disables them)
  before each forward, so it runs at the unmerged adapter's own speed.
- ``bank.decode(requests, adapters)`` / ``bank.generate_batch(requests, adapters)``
  run collab's decoding loop (``collab.decode.decode``: rules, stops, usage, KV
  cache) over one batch whose row i runs adapter ``adapters[i]``: each step is ONE
  forward of the PEFT model, with PEFT's mixed-adapter batches (the base layers run
  on the whole batch, each LoRA delta on its own rows; ``__base__`` rows get none).
  The per-row ``adapter_names`` reach the LoRA layers through the pre-forward hooks
  PEFT itself uses for ``forward(adapter_names=...)``, registered once per bank
  rather than around every call. Once the rows left all run one adapter, the step
  runs it as the active adapter (no per-row split).
  ``bank.session(prompts, adapters)`` is the same for method code that drives a
  ``Session`` itself.

``routers.system`` builds a bank for a route system with ``adapter_batch: true``
(its experts that are adapters of one base, and that base) and
``RoutedSystem.generate_batch`` sends the rows routed to any of them through one
``bank.generate_batch``. The server serves each ``AdapterExpert`` through its own
batcher (one adapter per batch, continuous batching as for any expert); it does not
mix adapters within one server batch.

How the rows' adapters follow the loop: the loop builds its ``Session`` itself, so
the batch is driven by a ``MixedAdapterExpert`` made for that run, whose
``forward`` reads the row -> adapter list attached to the KV cache it is given. A
new cache (the prefill, or the prefill of rows joining a running batch) takes the
next list announced with ``expect``. The run's rule (``AdapterRows``, wrapping the
caller's rule) reorders the list when the loop drops finished rows
(``Session.keep``) and appends the joining rows' adapters after ``Session.extend``,
so both row dropping and joining (continuous batching) are supported; joining
needs ``adapter_of``, a function from a joining request to its adapter.

Greedy answers of a mixed batch equal each row's adapter run unmerged alone (up to
the float rounding any batching has; the tests pin exact equality on tiny models).
They may differ from the merged expert's (``Expert.load``) answers in rare
near-ties: merging adds the LoRA product into the weights, which rounds otherwise.

Limits: LoRA adapters only (no DoRA: PEFT's mixed batches do not support it), all
of one base; code that calls submodules of ``AdapterExpert.model`` directly (not
through ``model(...)``) sees whichever adapter the bank last activated.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab.decode import Event, RequestRule, Session
from collab.errors import ModelLoadError
from collab.experts import Expert
from collab.refs import ResolvedRef, resolve_ref
from collab.system import Completion, GenerationRequest

if TYPE_CHECKING:
    import numpy as np
    import torch

    from collab.decode import Loop, Rule

#: The name PEFT's mixed batches give a row that runs the base model without adapters.
BASE = "__base__"

#: The attribute of a KV cache (a ``DynamicCache``) that lists its rows' adapters.
_ROWS = "collab_adapter_rows"


class _BankModel:
    """The bank's model as one expert sees it: calling it runs the PEFT model with that
    expert's adapter on every row (``adapter``), or with the per-row adapters the mixed
    driver set (``rows``); every other attribute is the base model's (``config``,
    ``parameters``, ``get_output_embeddings`` ...)."""

    def __init__(self, bank: AdapterBank, adapter: str | None) -> None:
        self._bank = bank
        self._adapter = adapter
        self.rows: list[str] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bank = self._bank
        with bank.lock:
            names = self.rows if self._adapter is None else None
            if self._adapter is None and names is None:
                raise ValueError(f"adapter bank '{bank.name}': a mixed batch was run with no adapter assigned to its rows")
            if names is not None and len(set(names)) > 1:
                bank._activate(None)
                bank._rows = names  # the LoRA layers' pre-forward hooks pass it on as adapter_names
                try:
                    return bank.peft(*args, **kwargs)
                finally:
                    bank._rows = None
            bank._activate(self._adapter if names is None else names[0])
            return bank.peft(*args, **kwargs)

    forward = __call__

    def eval(self) -> _BankModel:
        return self  # the bank's model is put in eval mode once, when loaded

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_bank"):  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._bank.hf_model, name)


class AdapterExpert(Expert):
    """One adapter of an ``AdapterBank`` (or the bank's base, ``adapter == BASE``) as an
    Expert: the bank's model and tokenizer, run with this adapter on every row. Views of
    one bank share its lock, so they may be used from several threads."""

    def __init__(self, bank: AdapterBank, name: str, adapter: str, *, ref: str | None = None) -> None:
        super().__init__(_BankModel(bank, adapter), bank.tokenizer, name, prompt_format=bank.prompt_format, ref=ref, batch_size=bank.batch_size)
        self.bank = bank
        self.adapter = adapter
        self._lock = bank.lock
        self._forward_args = bank.forward_args

    def trace_for(self, request: GenerationRequest) -> dict[str, Any]:
        t = super().trace_for(request)
        t["adapter"] = self.bank.adapter_label(self.adapter)
        return t

    def embed(self, texts: Sequence[str], layers: Sequence[int], max_tokens: int = 256, batch_size: int = 16) -> np.ndarray:
        with self._lock:  # the pooling hooks run the decoder layers directly: activate this adapter first
            self.bank._activate(self.adapter)
            return super().embed(texts, layers, max_tokens, batch_size)


class MixedAdapterExpert(Expert):
    """The bank as the driving expert of one batch whose rows run different adapters.

    ``forward`` reads the row -> adapter list attached to the KV cache it is given; a
    cache seen for the first time takes the next list announced with ``expect`` (in
    order). Made by ``AdapterBank.mixed`` for one run; it only generates (scoring goes
    to the per-adapter experts)."""

    def __init__(self, bank: AdapterBank) -> None:
        super().__init__(_BankModel(bank, None), bank.tokenizer, bank.name, prompt_format=bank.prompt_format, batch_size=bank.batch_size)
        self.bank = bank
        self._lock = bank.lock
        self._forward_args = bank.forward_args
        self._pending: deque[list[str]] = deque()

    def expect(self, adapters: Sequence[str]) -> None:
        """The experts (adapters) of the rows of the next new cache (a prefill), in row order."""
        self._pending.append(self.bank.check_adapters(adapters))

    @staticmethod
    def rows(cache: Any) -> list[str]:
        """The experts (adapters) of ``cache``'s rows, in row order (empty before its prefill)."""
        return getattr(cache, _ROWS, [])

    @staticmethod
    def set_rows(cache: Any, adapters: Sequence[str]) -> None:
        setattr(cache, _ROWS, list(adapters))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cache is None:
            raise ValueError(f"adapter bank '{self.bank.name}': a mixed batch runs through a KV-cache session (collab.decode.Session)")
        if not hasattr(cache, _ROWS):
            if not self._pending:
                raise ValueError(f"adapter bank '{self.bank.name}': rows were prefilled with no adapters announced (MixedAdapterExpert.expect)")
            self.set_rows(cache, self._pending.popleft())
        names = self.rows(cache)
        if len(names) != int(input_ids.shape[0]):
            raise ValueError(f"adapter bank '{self.bank.name}': {len(names)} row adapters for a batch of {int(input_ids.shape[0])} rows")
        model = self.model
        with self._lock:
            model.rows = [self.bank.label_of(n) for n in names]
            try:
                return super().forward(input_ids, attention_mask, cache, *args, **kwargs)
            finally:
                model.rows = None

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, share_context: bool | None = None) -> list[tuple[float, bool]]:
        raise TypeError(f"adapter bank '{self.bank.name}': score text with one adapter's expert (bank.expert(name)), not the mixed driver")


class AdapterRows:
    """A rule for a mixed-adapter run: the caller's rule (default: each request's own
    greedy or sampling settings), plus the bookkeeping that keeps each row's adapter
    with its row when the loop drops rows (``keep``) or adds them (``admit``: the new
    rows' adapters come from ``adapter_of``). Each row's trace is its adapter expert's."""

    def __init__(self, driver: MixedAdapterExpert, inner: Any, adapter_of: Callable[[GenerationRequest], str] | None = None) -> None:
        self.driver = driver
        self.inner = inner
        self.adapter_of = adapter_of
        self.loop: Loop | None = None
        self.feeds_session = bool(getattr(inner, "feeds_session", False))

    def start(self, loop: Loop) -> None:
        self.loop = loop
        if hasattr(self.inner, "start"):
            self.inner.start(loop)

    def __call__(self, logits: torch.Tensor, loop: Loop) -> Any:
        self.loop = loop
        return self.inner(logits, loop)

    def _cache(self) -> Any:
        assert self.loop is not None, "AdapterRows: the loop has not started"
        return self.loop.session.cache

    def trace(self, row: int) -> dict[str, Any]:
        assert self.loop is not None
        name = MixedAdapterExpert.rows(self._cache())[row]
        t = self.driver.bank.expert_for(name).trace_for(self.loop.requests[row])
        t["mixed_batch"] = True
        if hasattr(self.inner, "trace"):
            t.update(self.inner.trace(row))
        return t

    def keep(self, rows: Sequence[int]) -> None:
        cache = self._cache()
        names = MixedAdapterExpert.rows(cache)
        MixedAdapterExpert.set_rows(cache, [names[i] for i in rows])
        self.inner.keep(rows)

    def joining(self, requests: Sequence[GenerationRequest]) -> None:
        """Announce the adapters of rows about to join (before their prefill)."""
        if self.adapter_of is None:
            raise TypeError("AdapterRows: rows join a running mixed batch only with adapter_of (request -> adapter)")
        self.driver.expect([self.adapter_of(r) for r in requests])

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        assert self.loop is not None and self.adapter_of is not None
        session = self.loop.session
        names = MixedAdapterExpert.rows(session.cache)
        if len(names) < session.batch:  # joined a running batch (Session.extend); a fresh session has its own list
            MixedAdapterExpert.set_rows(session.cache, names + [self.adapter_of(r) for r in requests])
        self.inner.admit(requests)


class AdapterBank:
    """One base model with several LoRA adapters loaded unmerged (see the module's docstring).

    ``adapters`` maps each expert name to its adapter directory; ``base_name``, if
    given, is an expert name for the base itself (no adapter). Build it with
    ``AdapterBank.load`` (a base reference and adapter directories) or
    ``AdapterBank.from_refs`` (expert references that resolve to one base and its
    adapters, as a spec names them)."""

    def __init__(self, base: Expert, adapters: Mapping[str, str | Path], *, base_name: str | None = None, refs: Mapping[str, str] | None = None) -> None:
        if not adapters:
            raise ModelLoadError(f"adapter bank over '{base.name}': no adapters given")
        try:
            from peft import PeftModel
        except ImportError as e:  # pragma: no cover - peft is installed with the zoo extra
            raise ModelLoadError("an adapter bank needs peft (pip install peft, or the 'zoo' extra)") from e
        self.lock = threading.RLock()
        self.tokenizer = base.tokenizer
        self.prompt_format = base.prompt_format
        self.batch_size = base.batch_size
        self.hf_model = base.model
        self.forward_args = frozenset(inspect.signature(base.model.forward).parameters)
        dirs: dict[Path, str] = {}  # adapter directory -> its PEFT adapter name (one copy per directory)
        self._adapter_of: dict[str, str] = {}
        self._labels: dict[str, str] = {BASE: "base"}
        taken = {BASE}
        for name, d in adapters.items():
            path = Path(d).resolve()
            if path not in dirs:
                _check_lora_dir(path)
                label = re.sub(r"\W", "_", name) or "adapter"
                while label in taken:
                    label += "_"
                taken.add(label)
                dirs[path] = label
                self._labels[label] = path.name
            self._adapter_of[name] = dirs[path]
        first, *rest = list(dirs.items())
        with warnings.catch_warnings():
            # peft reads a property that transformers 5 deprecates; the user can do nothing about it
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.peft = PeftModel.from_pretrained(base.model, str(first[0]), adapter_name=first[1])
            for path, label in rest:
                self.peft.load_adapter(str(path), adapter_name=label)
        self.peft.eval()
        self.can_join = _joins(base.model.config)
        self._rows: list[str] | None = None  # a mixed batch's per-row PEFT adapters, during its forward
        self._install_row_hooks()
        self._active: str | None = first[1]  # PEFT activates the first adapter it loads
        self.name = f"{base.name}+{'+'.join(adapters)}"
        self.base_name = base_name
        refs = dict(refs or {})
        self.experts: dict[str, AdapterExpert] = {n: AdapterExpert(self, n, a, ref=refs.get(n)) for n, a in self._adapter_of.items()}
        if base_name is not None:
            self._adapter_of[base_name] = BASE
            self.experts[base_name] = AdapterExpert(self, base_name, BASE, ref=refs.get(base_name) or base.ref)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, base_ref: str, adapters: Mapping[str, str | Path], *, base_name: str | None = None, refs: Mapping[str, str] | None = None, **options: Any
    ) -> AdapterBank:
        """Load the base from ``base_ref`` (anything ``Expert.load`` takes, with its
        ``options``: dtype, device, prompt_format, allow_pickle, batch_size) and add
        ``adapters`` (expert name -> PEFT LoRA directory) to it, unmerged."""
        base = Expert.load(base_ref, name=base_name or Path(str(base_ref)).name.removeprefix("zoo:"), **options)
        return cls(base, adapters, base_name=base_name, refs=refs)

    @classmethod
    def from_refs(cls, refs: Mapping[str, str], **options: Any) -> AdapterBank:
        """A bank over experts given by reference (name -> ``zoo:NAME`` or a path), every
        one of them a LoRA adapter of one base or that base itself; ModelLoadError
        otherwise. The base loads once, from the base expert's reference if one is
        given, else from the reference the adapters record."""
        resolved = {n: resolve_ref(r) for n, r in refs.items()}
        keys = {n: _base_key(res) for n, res in resolved.items()}
        if len(set(keys.values())) != 1:
            raise ModelLoadError(f"adapter bank: {', '.join(refs)} are not all adapters of one base model ({', '.join(f'{n} -> {k[0]}' for n, k in keys.items())})")
        bases = [n for n, res in resolved.items() if res.adapter is None]
        if len(bases) > 1:
            raise ModelLoadError(f"adapter bank: {', '.join(bases)} are all the base model; name it once")
        adapters = {n: res.adapter for n, res in resolved.items() if res.adapter is not None}
        if not adapters:
            raise ModelLoadError(f"adapter bank: none of {', '.join(refs)} is a LoRA adapter")
        base_name = bases[0] if bases else None
        base_ref = refs[base_name] if base_name is not None else adapter_base_ref(next(iter(adapters.values())))
        return cls.load(base_ref, adapters, base_name=base_name, refs=refs, **options)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ adapters
    def expert(self, name: str) -> AdapterExpert:
        """The expert called ``name`` (an adapter's, or the base's)."""
        if name not in self.experts:
            raise KeyError(f"adapter bank '{self.name}': no expert '{name}' (has: {', '.join(self.experts)})")
        return self.experts[name]

    def expert_for(self, name: str) -> AdapterExpert:
        """The expert called ``name``, or else the (first) expert that runs the PEFT adapter ``name``."""
        if name in self.experts:
            return self.experts[name]
        for e in self.experts.values():
            if e.adapter == name:
                return e
        raise KeyError(f"adapter bank '{self.name}': no expert runs adapter '{name}'")

    def adapter_label(self, adapter: str) -> str:
        """What a trace calls ``adapter``: its directory's name, or 'base'."""
        return self._labels[adapter]

    def label_of(self, name: str) -> str:
        """The PEFT adapter an expert name runs (``BASE`` for the base); a PEFT adapter
        name (or ``BASE``) stands for itself. KeyError on an unknown name."""
        if name in self._adapter_of:
            return self._adapter_of[name]
        if name in self._labels:
            return name
        raise KeyError(f"adapter bank '{self.name}': no expert '{name}' (has: {', '.join(self.experts)})")

    def check_adapters(self, names: Sequence[str]) -> list[str]:
        """``names`` as a list, after checking each is one of the bank's experts (``label_of``)."""
        for n in names:
            self.label_of(n)
        return list(names)

    def _install_row_hooks(self) -> None:
        """Register, once, the pre-forward hooks by which PEFT's mixed-adapter batches reach
        the LoRA layers: each passes the batch's per-row adapters (``_rows``, set around a
        mixed forward) as the layer's ``adapter_names``. They are the hooks PEFT registers
        and removes around every ``forward(adapter_names=...)`` call, which walks all the
        model's modules twice per call (tens of ms per decoding step on SmolLM2)."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import AuxiliaryTrainingWrapper

        def inject(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            if self._rows is None:
                return None
            kwargs["adapter_names"] = self._rows
            return args, kwargs

        for module in self.peft.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                module.register_forward_pre_hook(inject, with_kwargs=True)

    def _activate(self, adapter: str | None) -> None:
        """Make the PEFT model run ``adapter`` on every row (``BASE``: no adapter), or,
        with None, leave adapters enabled for a mixed batch's ``adapter_names``. Called
        under the lock, before each forward."""
        if adapter == self._active or (adapter is None and self._active != BASE):
            return
        if adapter == BASE:
            self.peft.base_model.disable_adapter_layers()
        else:
            if self._active == BASE:
                self.peft.base_model.enable_adapter_layers()
            if adapter is not None:
                self.peft.set_adapter(adapter, inference_mode=True)
        self._active = adapter if adapter is not None else self.peft.active_adapter

    # ------------------------------------------------------------------ decoding
    def mixed(self) -> MixedAdapterExpert:
        """A driving expert for one mixed-adapter run (one per run: it holds the run's pending prefills)."""
        return MixedAdapterExpert(self)

    def session(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str], *, hidden_states: bool = False) -> AdapterSession:
        """A KV-cache session over ``prompts`` whose row i runs ``adapters[i]`` (expert names)."""
        return AdapterSession(self.mixed(), prompts, adapters, hidden_states=hidden_states)

    def decode(
        self,
        requests: Sequence[GenerationRequest],
        adapters: Sequence[str],
        rule: Rule | None = None,
        *,
        prompts: Sequence[Sequence[int]] | None = None,
        admit: Callable[[Loop], Sequence[tuple[GenerationRequest, Sequence[int]]]] | None = None,
        adapter_of: Callable[[GenerationRequest], str] | None = None,
    ) -> Iterator[list[Event]]:
        """``collab.decode.decode`` over one batch whose row i runs expert ``adapters[i]``
        (an adapter's expert name, or the base's): one forward per step for all rows.
        With ``admit`` (continuous batching), joining requests take the adapter
        ``adapter_of(request)`` returns; finished rows leave the batch with theirs."""
        from collab import decode as loop_mod

        if len(adapters) != len(requests):
            raise ValueError(f"adapter bank '{self.name}': {len(adapters)} adapters for {len(requests)} requests")
        driver = self.mixed()
        driver.expect(adapters)
        inner = rule or RequestRule(requests)
        if admit is not None and not (hasattr(inner, "admit") and hasattr(inner, "keep")):
            raise TypeError(f"decode: admit= needs a rule with admit() and keep(); {type(inner).__name__} has not")
        rows = AdapterRows(driver, inner, adapter_of)
        return loop_mod.decode(driver, requests, rows, prompts=prompts, admit=None if admit is None else _Joining(admit, rows))

    def generate_batch(self, requests: Sequence[GenerationRequest], adapters: Sequence[str], *, drop_finished: bool = True) -> list[Completion]:
        """Completions for ``requests``, row i answered by expert ``adapters[i]``, in
        batches of ``batch_size`` (prompts of similar length together), each decoded
        with one forward per step for all its rows; in the order of ``requests``.
        With ``drop_finished`` finished rows leave their batch (where the KV cache
        allows it), so the others' steps run on fewer rows."""
        if len(adapters) != len(requests):
            raise ValueError(f"adapter bank '{self.name}': {len(adapters)} adapters for {len(requests)} requests")
        self.check_adapters(adapters)
        any_expert = next(iter(self.experts.values()))  # the experts share the tokenizer and prompt format
        encoded = [any_expert.encode(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        out: list[Completion | None] = [None] * len(requests)
        drop = drop_finished and self.can_join
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # copies of their own: the loop tells rows apart by their request's identity once rows leave
            own = [copy.copy(requests[i]) for i in chunk]
            where = {id(r): i for r, i in zip(own, chunk)}
            admit = _no_joins if drop else None
            for step in self.decode(own, [adapters[i] for i in chunk], prompts=[encoded[i] for i in chunk], admit=admit):
                for e in step:
                    if e.completion is not None:
                        out[where[id(e.request)]] = e.completion
        return [c for c in out if c is not None]

    def __repr__(self) -> str:
        return f"AdapterBank({self.name!r}, experts={list(self.experts)})"


def _no_joins(loop: Loop) -> list[tuple[GenerationRequest, Sequence[int]]]:
    """An ``admit`` that admits nothing: with it the loop only drops finished rows."""
    return []


class _Joining:
    """The caller's ``admit``, announcing the joining rows' adapters before their prefill."""

    def __init__(self, admit: Callable[[Loop], Sequence[tuple[GenerationRequest, Sequence[int]]]], rows: AdapterRows) -> None:
        self.admit = admit
        self.rows = rows

    def __call__(self, loop: Loop) -> list[tuple[GenerationRequest, Sequence[int]]]:
        new = list(self.admit(loop))
        if new:
            self.rows.joining([r for r, _ in new])
        return new


def _joins(config: Any) -> bool:
    """Whether rows can leave and join a running batch of a model (no sliding-window cache layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


class AdapterSession(Session):
    """A ``Session`` whose row i runs adapter ``adapters[i]``: one forward per feed for
    all rows. ``keep`` and ``extend`` carry the rows' adapters along."""

    def __init__(self, driver: MixedAdapterExpert, prompts: Sequence[Sequence[int]], adapters: Sequence[str], **kwargs: Any) -> None:
        if len(adapters) != len(prompts):
            raise ValueError(f"AdapterSession: {len(adapters)} adapters for {len(prompts)} prompts")
        driver.expect(adapters)
        super().__init__(driver, prompts, **kwargs)

    @property
    def adapters(self) -> list[str]:
        """Each row's expert (adapter), in row order."""
        return MixedAdapterExpert.rows(self.cache)

    def keep(self, rows: Sequence[int]) -> None:
        names = self.adapters
        super().keep(rows)
        MixedAdapterExpert.set_rows(self.cache, [names[i] for i in rows])

    def extend(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str] | None = None) -> None:  # type: ignore[override]
        """Prefill ``prompts`` as new rows running ``adapters`` (required)."""
        if adapters is None or len(adapters) != len(prompts):
            raise ValueError("AdapterSession.extend: give one adapter per joining prompt")
        driver = self.expert
        assert isinstance(driver, MixedAdapterExpert)
        names = self.adapters
        driver.expect(adapters)
        super().extend(prompts)
        MixedAdapterExpert.set_rows(self.cache, names + list(adapters))


# ------------------------------------------------------------------ grouping
def _check_lora_dir(path: Path) -> None:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path}: not a PEFT adapter directory (adapter_config.json not found)")
    if not (path / "adapter_model.safetensors").exists():
        raise ModelLoadError(f"{path}: adapter_model.safetensors not found (pickled adapters are not loaded)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if str(cfg.get("peft_type", "")).upper() != "LORA" or cfg.get("use_dora"):
        raise ModelLoadError(f"{path}: an adapter bank holds plain LoRA adapters; this one is {cfg.get('peft_type')}{' with DoRA' if cfg.get('use_dora') else ''}")


def _is_lora(path: Path) -> bool:
    try:
        _check_lora_dir(path)
    except (ModelLoadError, ValueError, OSError):
        return False
    return True


def _base_key(res: ResolvedRef) -> tuple[str, str | None]:
    """What identifies the base weights a resolved reference loads."""
    return (str(res.path.resolve()), res.gguf_file)


def adapter_base_ref(adapter_dir: str | Path) -> str:
    """The reference of the base model a PEFT adapter directory names (its
    ``base_model_name_or_path``, relative to the directory if it is a path there)."""
    path = Path(adapter_dir)
    base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{path}/adapter_config.json: field 'base_model_name_or_path' is missing")
    base = str(base)
    if base.startswith("zoo:") or Path(base).is_absolute() or not (path / base).exists():
        return base
    return str(path / base)


def adapter_groups(refs: Mapping[str, str]) -> list[list[str]]:
    """Which of ``refs`` (expert name -> reference) can share an ``AdapterBank``: groups
    of names that resolve to one base and its plain LoRA adapters, each group with at
    least one adapter and two names, in the order of ``refs``. A reference that does
    not resolve (or is not LoRA) is in no group; loading it reports why."""
    resolved = {name: _resolved_or_none(ref) for name, ref in refs.items()}
    by_base: dict[tuple[str, str | None], list[str]] = {}
    for name, res in resolved.items():
        if res is not None and (res.adapter is None or _is_lora(res.adapter)):
            by_base.setdefault(_base_key(res), []).append(name)
    groups = []
    for names in by_base.values():
        n_base = sum(resolved[n].adapter is None for n in names)  # type: ignore[union-attr]
        if len(names) >= 2 and n_base < len(names) and n_base <= 1:
            groups.append(names)
    return groups


def _resolved_or_none(ref: str) -> ResolvedRef | None:
    """``resolve_ref(ref)``, or None where it does not resolve (the expert's own loading says why)."""
    try:
        return resolve_ref(ref)
    except Exception:  # noqa: BLE001
        return None
