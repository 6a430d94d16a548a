"""Experts: one causal LM and its tokenizer, answering through the System protocol.

``Expert.load(ref)`` takes a Hugging Face directory, a ``.gguf`` file or a zoo
name (``zoo:smollm2-135m-instruct``). GGUF files are de-quantised once and the
result cached as safetensors, so later loads take seconds. ``.model`` and
``.tokenizer`` stay reachable for methods that need logits, hidden states or
the KV cache (``Expert.forward``).
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from collab.errors import CollabError, ContextLengthError, ModelLoadError
from collab.io import atomic_directory, atomic_write_json, cache_root
from collab.packing import PackedBatch, PackedRow, pack_rows
from collab.system import BaseSystem, Completion, GenerationRequest, Message, StreamChunk, Usage

if TYPE_CHECKING:
    import numpy as np
    import torch

    from collab.decode import Session

#: Prompt format for models whose tokenizer has no chat template (e.g. Gemma-3-270M
#: base). An optional system message comes first, then alternating turns, and the
#: prompt ends with ``"Assistant:"`` so the model writes the answer:
#:
#:     {system}\n\nUser: {user}\nAssistant: {assistant}\nUser: {user}\nAssistant:
PLAIN_USER = "User: "
PLAIN_ASSISTANT = "Assistant:"
PLAIN_STOP = "\nUser:"

#: The ``dtype`` values an expert loads in.
DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_CACHE_VERSION = 1


def render_plain_prompt(messages: Sequence[Message]) -> str:
    """Render chat messages in collab's plain prompt format (see ``PLAIN_USER``)."""
    parts: list[str] = []
    body = list(messages)
    if body and body[0]["role"] == "system":
        parts.append(body[0]["content"].strip() + "\n\n")
        body = body[1:]
    for m in body:
        if m["role"] == "user":
            parts.append(f"{PLAIN_USER}{m['content'].strip()}\n")
        elif m["role"] == "assistant":
            parts.append(f"{PLAIN_ASSISTANT} {m['content'].strip()}\n")
        else:  # a system message in the middle of a conversation
            parts.append(m["content"].strip() + "\n")
    parts.append(PLAIN_ASSISTANT)
    return "".join(parts)


@dataclass
class ResolvedRef:
    """Where a model reference points: a directory to load from, and how."""

    path: Path
    gguf_file: str | None = None
    cache_key: str | None = None
    name: str | None = None
    prompt_format: str | None = None
    adapter: Path | None = None
    base_ref: str | None = None


def resolve_ref(ref: str | os.PathLike[str]) -> ResolvedRef:
    """Turn ``zoo:NAME``, a ``.gguf`` path or a directory into a ResolvedRef, or
    raise ModelLoadError naming what is missing."""
    ref_s = str(ref)
    if ref_s.startswith("zoo:"):
        from collab import zoo

        return zoo.resolve(ref_s[4:])
    path = Path(ref_s).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{ref_s}: no such file or directory (expected a Hugging Face model directory, a .gguf file or zoo:NAME)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{ref_s}: expected a .gguf file or a model directory, found a '{path.suffix}' file")
        _check_gguf_magic(path)
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        import hashlib

        return ResolvedRef(
            path=path.parent,
            gguf_file=path.name,
            cache_key=f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}",
            name=path.stem,
        )
    if (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{path}/adapter_config.json: field 'base_model_name_or_path' is missing")
        base_res = resolve_ref(base if str(base).startswith("zoo:") or Path(base).is_absolute() else _relative(path, base))
        base_res.adapter = path
        base_res.name = path.name
        base_res.base_ref = str(base)
        return base_res
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: not a model directory (config.json not found)")
    return ResolvedRef(path=path, name=path.name)


def _relative(adapter_dir: Path, base: str) -> str:
    candidate = adapter_dir / base
    return str(candidate) if candidate.exists() else base


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (expected magic bytes b'GGUF', found {magic!r}); the file is corrupt or of another format")


#: Files of which at least one makes a directory's tokenizer loadable.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _check_safetensors(model_dir: Path) -> None:
    """ModelLoadError naming the file if a ``*.safetensors`` header is unreadable
    (a truncated download or copy), before transformers reports it without the name."""
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="numpy"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError derives from Exception only
            raise ModelLoadError(f"{f}: not a readable safetensors file, truncated or corrupt ({_one_line(e)})") from e


def _torch_dtype(dtype: str, what: str) -> Any:
    if dtype not in DTYPES:
        raise ModelLoadError(f"{what}: dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
    import torch

    return "auto" if dtype == "auto" else getattr(torch, dtype)


def gguf_cache_dir(cache_key: str) -> Path:
    """Where the de-quantised safetensors of the GGUF with ``cache_key`` live."""
    return cache_root() / "gguf" / f"{cache_key}-v{GGUF_CACHE_VERSION}"


def dequantised_dir(res: ResolvedRef) -> Path:
    """The safetensors model directory for a GGUF reference: de-quantised on first
    use into ``$COLLAB_CACHE/gguf/``, reused afterwards."""
    assert res.gguf_file is not None and res.cache_key is not None
    target = gguf_cache_dir(res.cache_key)
    if (target / "collab_source.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path = res.path / res.gguf_file
    if not gguf_path.exists():
        raise ModelLoadError(f"{gguf_path}: GGUF file not found")
    _check_gguf_magic(gguf_path)
    t0 = time.perf_counter()
    import sys

    sys.stderr.write(f"collab: de-quantising {gguf_path.name} once (tens of seconds); cached in {target}\n")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(res.path), gguf_file=res.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(res.path), gguf_file=res.gguf_file, dtype=torch.float32)
    except Exception as e:  # gguf's reader raises many kinds of errors on a damaged file
        raise ModelLoadError(f"{gguf_path}: cannot read GGUF model ({type(e).__name__}: {e})") from e
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained;
    # the weights are already de-quantised, so drop it and save a plain model.
    for holder in (model.config, getattr(model, "hf_quantizer", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            try:
                delattr(holder, "quantization_config")
            except AttributeError:
                pass
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(
            tmp / "collab_source.json",
            {"gguf": str(gguf_path), "seconds": round(time.perf_counter() - t0, 2), "version": GGUF_CACHE_VERSION},
        )
    return target


class Expert(BaseSystem):
    """One causal language model with its tokenizer; a System.

    Build it with ``Expert.load(ref)``. Greedy decoding (``temperature=0``) is
    deterministic; sampling is reproducible given ``seed``. All calls on one
    expert are serialised by a lock, so an Expert may be shared across threads.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "expert",
        *,
        prompt_format: str | None = None,
        ref: str | None = None,
        batch_size: int = 8,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.ref = ref
        self.batch_size = batch_size
        self.share_context = True
        self._slices_logits: bool | None = None  # whether forward takes a boolean logits_to_keep (found on first use)
        self._forward_args: frozenset[str] | None = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if prompt_format is None:
            prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"
        if prompt_format not in ("chat_template", "plain"):
            raise ModelLoadError(f"prompt_format: expected 'chat_template' or 'plain', found {prompt_format!r}")
        if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"expert '{name}': prompt_format 'chat_template' asked for, but the tokenizer has no chat template")
        self.prompt_format = prompt_format
        self._lock = threading.RLock()
        self.eos_token_ids = self._eos_ids()

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        ref: str | os.PathLike[str],
        *,
        name: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        prompt_format: str | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        batch_size: int = 8,
    ) -> "Expert":
        """Load an expert from a HF directory, a ``.gguf`` file, a PEFT adapter
        directory or ``zoo:NAME``. ``.bin`` pickles load only with ``allow_pickle``."""
        from collab.devices import check_device

        what = f"expert '{name}'" if name else str(ref)
        torch_dtype = _torch_dtype(dtype, what)
        try:
            device = check_device(device, f"{what}: device")
        except CollabError as e:
            raise ModelLoadError(str(e)) from e
        res = resolve_ref(ref)
        model_dir = dequantised_dir(res) if res.gguf_file else res.path
        has_st = any(model_dir.glob("*.safetensors"))
        if not has_st:
            if any(model_dir.glob("*.bin")) and not allow_pickle:
                raise ModelLoadError(
                    f"{model_dir}: weights are pickle files (.bin) only; loading them can run arbitrary code. "
                    "Convert to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the file"
                )
            if not any(model_dir.glob("*.bin")):
                raise ModelLoadError(f"{model_dir}: no weights found (expected *.safetensors)")
        _check_safetensors(model_dir)
        if not any((model_dir / f).exists() for f in _TOKENIZER_FILES):
            raise ModelLoadError(
                f"{model_dir}: no tokenizer found (expected one of {', '.join(_TOKENIZER_FILES)} beside config.json)"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {_one_line(e)})") from e
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir),
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=has_st,
                device_map=None if device == "cpu" else device,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"{model_dir}: cannot load the model ({type(e).__name__}: {_one_line(e)})") from e
        if res.adapter is not None:
            model = _apply_adapter(model, res.adapter)
        return cls(
            model,
            tokenizer,
            name=name or res.name or Path(str(ref)).name,
            prompt_format=prompt_format or res.prompt_format,
            ref=str(ref),
            batch_size=batch_size,
        )

    # ---------------------------------------------------------------- encoding
    @property
    def device(self) -> "torch.device":
        return next(self.model.parameters()).device

    @property
    def context_window(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for v in (self.tokenizer.eos_token_id, gen_eos):
            if isinstance(v, int):
                ids.append(v)
            elif isinstance(v, (list, tuple)):
                ids.extend(int(x) for x in v)
        if self.prompt_format == "chat_template":
            for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
                tid = self.tokenizer.convert_tokens_to_ids(tok)
                if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                    ids.append(tid)
        return sorted(set(ids))

    def render(self, request: GenerationRequest) -> str:
        """The exact text fed to the model for ``request``."""
        if request.prompt is not None:
            return request.prompt
        assert request.messages is not None
        if self.prompt_format == "chat_template":
            return self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        return render_plain_prompt(request.messages)

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids for ``request``; raises ContextLengthError if they do not fit."""
        text = self.render(request)
        # Chat templates already write the special tokens they need.
        add_special = not (request.messages is not None and self.prompt_format == "chat_template")
        ids = self.tokenizer(text, add_special_tokens=add_special).input_ids
        if not ids:  # an empty raw prompt: start from the beginning-of-text token, as OpenAI servers do
            ids = [self._start_token()]
        if len(ids) >= self.context_window:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens; expert '{self.name}' has a context window of {self.context_window} tokens"
            )
        return ids

    def _start_token(self) -> int:
        """The token an empty text starts from: BOS where the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eos_token_ids[0]

    def stops_for(self, request: GenerationRequest) -> list[str]:
        """The stop strings of ``request``, plus the turn marker of the plain prompt format."""
        stops = list(request.stop)
        if request.messages is not None and self.prompt_format == "plain":
            stops.append(PLAIN_STOP)
        return stops

    def trace_for(self, request: GenerationRequest) -> dict[str, Any]:
        """The trace of one answer: which expert, in which prompt format."""
        fmt = "raw" if request.prompt is not None else self.prompt_format
        return {"system": self.name, "type": "expert", "expert": self.name, "prompt_format": fmt}

    def max_new_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        """How many tokens ``request`` may add to a prompt of ``prompt_len`` tokens."""
        return max(1, min(request.max_tokens, self.context_window - prompt_len))

    # -------------------------------------------------------------- generation
    # All three go through collab.decode's loop: the same tokens, stops and usage
    # whether a request is generated alone, in a batch or streamed.
    def generate(self, request: GenerationRequest) -> Completion:
        from collab import decode

        return decode.generate(self, request)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Generate for several requests in padded batches of ``batch_size``.

        Prompts of similar length share a batch (less padding to compute);
        results come back in the order of ``requests``. Greedy answers match
        ``generate`` up to float rounding from padding; a seeded sample is the
        same alone or in a batch, up to the same rounding."""
        from collab import decode

        encoded = [self.encode(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            done = decode.generate_batch(self, [requests[i] for i in chunk], prompts=[encoded[i] for i in chunk])
            for i, c in zip(chunk, done):
                results[i] = c
        return [c for c in results if c is not None]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """Yield text as it is generated; the joined chunks equal ``generate``'s text."""
        from collab import decode

        return decode.stream(self, request)

    def session(self, prompts: Sequence[Sequence[int]], *, hidden_states: bool = False, grad: bool = False) -> "Session":
        """A KV-cache session over ``prompts`` (token ids): prefilled now, then fed
        token by token or chunk by chunk (``collab.decode.Session``)."""
        from collab.decode import Session

        return Session(self, prompts, hidden_states=hidden_states, grad=grad)

    # ------------------------------------------------------------------ scoring
    def _split_context(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-evaluation-harness does: trailing context whitespace belongs to the continuation.
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.tokenizer(context + continuation).input_ids
        ctx = self.tokenizer(context).input_ids
        if not ctx:
            return [self._start_token()], whole
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, context: str, continuation: str) -> float:
        """log P(continuation | context) summed over the continuation's tokens."""
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(
        self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, share_context: bool | None = None
    ) -> list[tuple[float, bool]]:
        """For each (context, continuation): the summed log-probability and whether
        the continuation is the greedy one, as lm-eval's ``loglikelihood`` returns.

        Continuations of the same context share one pass over it: the context
        and all its continuations are packed into one row whose attention mask
        lets each continuation see the context and itself only (positions restart
        after the context), so a four-way multiple-choice question costs one
        context plus four answers instead of four contexts. Rows are sorted by
        length and sent ``batch_size`` at a time; logits are computed only where
        a continuation token is predicted. ``share_context=False`` (or the
        expert's ``share_context`` attribute) scores every pair in its own row.
        """
        split = [self._split_context(c, x) for c, x in pairs]
        share = self.share_context if share_context is None else share_context
        rows = self._pack_rows(split) if share else [PackedRow(ctx, [(i, cont)]) for i, (ctx, cont) in enumerate(split)]
        rows.sort(key=lambda r: -r.length)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        bs = batch_size or self.batch_size
        for start in range(0, len(rows), bs):
            for i, res in self._score_rows(rows[start : start + bs]):
                out[i] = res
        return out

    def _pack_rows(self, split: list[tuple[list[int], list[int]]]) -> list[PackedRow]:
        limit = self.context_window
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        if window:  # a packed row must not reach past a sliding-window layer's span
            limit = min(limit, int(window))
        return pack_rows(split, limit)

    def _score_rows(self, rows: list[PackedRow]) -> list[tuple[int, tuple[float, bool]]]:
        batch = PackedBatch.build(rows, self.context_window, self.tokenizer.pad_token_id, next(self.model.parameters()).dtype)
        return batch.scores(self._logits_at(batch.ids, batch.mask, batch.positions, batch.keep))

    def _logits_at(self, ids: "torch.Tensor", mask: "torch.Tensor", pos: "torch.Tensor", keep: "torch.Tensor") -> "torch.Tensor":
        """Logits at the ``keep`` positions only, flattened row-major; the vocabulary
        projection of every other position is skipped where transformers allows it."""
        import torch

        dev = self.device
        args = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": pos.to(dev), "use_cache": False}
        n_keep = int(keep.sum())
        if self._slices_logits is None:
            self._slices_logits = self._takes("logits_to_keep")
        with self._lock, torch.inference_mode():
            if self._slices_logits:
                try:
                    logits = self.model(**args, logits_to_keep=keep.to(dev)).logits
                except (TypeError, IndexError, RuntimeError):
                    logits = None  # a release that does not take a boolean logits_to_keep
                if logits is not None and logits.dim() == 2 and logits.shape[0] == n_keep:
                    return logits
                if logits is not None and logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(keep.shape):
                    return logits[keep.to(dev)]
                self._slices_logits = False
            return self.model(**args).logits[keep.to(dev)]

    def loglikelihood_rolling(self, text: str) -> float:
        """log P(text) under the model, in windows of the context length (for perplexity)."""
        import torch

        ids = self.tokenizer(text).input_ids
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_token_ids[0]
        if not ids or ids[0] != prefix:
            ids = [prefix] + ids
        total = 0.0
        win = self.context_window
        start = 1
        while start < len(ids):
            end = min(len(ids), start + win - 1)
            ctx_start = max(0, end - win)
            seq = torch.tensor([ids[ctx_start:end]], device=self.device)
            with self._lock, torch.inference_mode():
                logp = torch.log_softmax(self.model(input_ids=seq).logits.float(), dim=-1)[0]
            targets = torch.tensor(ids[start:end], device=self.device)
            pos = torch.arange(start - ctx_start - 1, end - ctx_start - 1, device=self.device)
            total += float(logp[pos].gather(1, targets[:, None]).sum())
            start = end
        return total

    # ------------------------------------------------------------ model access
    def forward(
        self,
        input_ids: "torch.Tensor",
        attention_mask: "torch.Tensor | None" = None,
        past_key_values: Any = None,
        output_hidden_states: bool = False,
        use_cache: bool = True,
        *,
        position_ids: "torch.Tensor | None" = None,
        grad: bool = False,
        logits_to_keep: int = 0,
    ) -> Any:
        """One forward pass: the HF output with ``.logits`` (B, T, V),
        ``.past_key_values`` (the KV cache) and, if asked, ``.hidden_states``.

        ``attention_mask`` covers the cached tokens and the new ones (B, past + T);
        ``position_ids`` (B, T) place left-padded rows; ``grad=True`` runs outside
        inference mode so training code can backpropagate; ``logits_to_keep=k``
        computes logits for the last k positions only (0: all)."""
        import contextlib

        import torch

        kwargs: dict[str, Any] = {"output_hidden_states": output_hidden_states, "use_cache": use_cache}
        if past_key_values is not None:
            # transformers >= 5.2x names the KV cache argument ``cache``; older releases ``past_key_values``
            kwargs[self._cache_arg] = past_key_values
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(self.device)
        if logits_to_keep and self._takes("logits_to_keep"):
            kwargs["logits_to_keep"] = logits_to_keep
        mode = contextlib.nullcontext() if grad else torch.inference_mode()
        with self._lock, mode:
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                **kwargs,
            )
        if logits_to_keep and out.logits.shape[1] > logits_to_keep:
            out.logits = out.logits[:, -logits_to_keep:]
        if not hasattr(out, "past_key_values") and hasattr(out, "cache"):
            out.past_key_values = out.cache
        return out

    def embed(self, texts: Sequence[str], layers: Sequence[int], max_tokens: int = 256, batch_size: int = 16) -> "np.ndarray":
        """(n, len(layers) x hidden) float32: each text's hidden states at ``layers``
        (1-based decoder layers, the last one after the final norm), averaged over its
        first ``max_tokens`` tokens; the pass stops after the deepest layer asked for."""
        from collab.embedding import pooled_hidden_states

        with self._lock:
            return pooled_hidden_states(self.model, self.tokenizer, list(texts), layers, max_tokens, batch_size)

    def _takes(self, argument: str) -> bool:
        """Whether the model's forward takes ``argument`` (read once per model)."""
        if getattr(self, "_forward_args", None) is None:
            self._forward_args = frozenset(inspect.signature(self.model.forward).parameters)
        return argument in self._forward_args

    @property
    def _cache_arg(self) -> str:
        return "cache" if self._takes("cache") else "past_key_values"


def _apply_adapter(model: Any, adapter_dir: Path) -> Any:
    """Merge a PEFT LoRA adapter into its base so the expert runs at base speed."""
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - peft is installed with the zoo extra
        raise ModelLoadError(f"{adapter_dir}: loading an adapter needs peft (pip install peft)") from e
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise ModelLoadError(f"{adapter_dir}: adapter_model.safetensors not found (pickled adapters are not loaded)")
    import warnings

    with warnings.catch_warnings():
        # peft reads a property that transformers 5 deprecates; the user can do nothing about it
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        return peft_model.merge_and_unload()


class RemoteExpert(BaseSystem):
    """An expert behind an OpenAI-compatible HTTP endpoint (vLLM, SGLang, another ``collab serve``).

    ``url`` is the API base (``http://host:port/v1``). Chat requests go to
    ``/chat/completions``, raw prompts to ``/completions``; streaming reads the
    server-sent events. ``loglikelihood`` uses ``/completions`` with
    ``echo`` and ``logprobs``, which vLLM and collab serve support.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, name: str | None = None, timeout: float = 120.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.name = name or model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _body(self, request: GenerationRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": stream,
        }
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.messages is not None:
            body["messages"] = request.messages
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    def _trace(self, remote_trace: Any = None) -> dict[str, Any]:
        t: dict[str, Any] = {"system": self.name, "type": "remote", "expert": self.name, "url": self.url, "model": self.model}
        if remote_trace:
            t["remote"] = remote_trace
        return t

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        from collab.errors import RemoteError

        try:
            resp = self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: {type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: HTTP {resp.status_code}: {_error_message(resp)}")
        return resp.json()

    def generate(self, request: GenerationRequest) -> Completion:
        path, body = self._body(request, stream=False)
        data = self._post(path, body)
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = data.get("usage") or {}
        return Completion(
            text=text or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
            trace=self._trace(data.get("collab")),
        )

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        import httpx

        from collab.errors import RemoteError

        path, body = self._body(request, stream=True)
        finish: str | None = None
        usage = Usage()
        remote_trace = None
        try:
            with self._client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: HTTP {resp.status_code}: {_error_message(resp)}")
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if event.get("usage"):
                        u = event["usage"]
                        usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
                    remote_trace = event.get("collab") or remote_trace
                    for choice in event.get("choices") or []:
                        delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                        if delta:
                            yield StreamChunk(text=delta)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
        except httpx.HTTPError as e:
            raise RemoteError(f"remote expert '{self.name}' at {self.url}{path}: {type(e).__name__}: {e}") from e
        yield StreamChunk(text="", finish_reason=finish or "stop", usage=usage, trace=self._trace(remote_trace))

    def loglikelihood(self, context: str, continuation: str) -> float:
        """log P(continuation | context), from the endpoint's echoed prompt logprobs."""
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        """For each (context, continuation): the summed log-probability and whether
        every continuation token was the endpoint's top choice (False where the
        endpoint returns no top logprobs). One request per pair."""
        from collab.errors import RemoteError

        out = []
        for context, continuation in pairs:
            body = {"model": self.model, "prompt": context + continuation, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
            data = self._post("/completions", body)
            lp = data["choices"][0].get("logprobs") or {}
            offsets, token_lps = lp.get("text_offset"), lp.get("token_logprobs")
            if not offsets or token_lps is None:
                raise RemoteError(f"remote expert '{self.name}': the endpoint returned no echoed logprobs; it cannot score text")
            tokens, tops = lp.get("tokens") or [], lp.get("top_logprobs") or []
            start = len(context)
            total, greedy = 0.0, bool(tops)
            for i, (off, v) in enumerate(zip(offsets, token_lps)):
                if off < start or v is None:
                    continue
                total += float(v)
                top = tops[i] if i < len(tops) else None
                if not top or i >= len(tokens) or max(top, key=top.get) != tokens[i]:
                    greedy = False
            out.append((total, greedy))
        return out

    def close(self) -> None:
        self._client.close()


def _error_message(resp: Any) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message"))
        return str(err or resp.text[:200])
    except ValueError:
        return resp.text[:200]
