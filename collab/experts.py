"""Experts: one causal LM and its tokenizer, answering through the System protocol.

``Expert.load(ref)`` takes a Hugging Face directory, a ``.gguf`` file or a zoo
name (``zoo:smollm2-135m-instruct``). GGUF files are de-quantised once and the
result cached as safetensors, so later loads take seconds. ``.model`` and
``.tokenizer`` stay reachable for methods that need logits, hidden states or
the KV cache (``Expert.forward``).
"""

from __future__ import annotations

import inspect
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from collab.errors import CollabError, ContextLengthError, ModelLoadError
from collab.packing import PackedBatch, PackedRow, pack_rows
from collab.refs import dequantised_dir, resolve_ref
from collab.system import BaseSystem, Completion, GenerationRequest, Message, StreamChunk

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
        cache: Any = None,
        output_hidden_states: bool = False,
        use_cache: bool = True,
        *,
        position_ids: "torch.Tensor | None" = None,
        grad: bool = False,
        logits_to_keep: int = 0,
    ) -> Any:
        """One forward pass: the HF output with ``.logits`` (B, T, V),
        ``.cache`` (the KV cache, to pass back as ``cache``) and, if asked,
        ``.hidden_states``.

        ``attention_mask`` covers the cached tokens and the new ones (B, past + T);
        ``position_ids`` (B, T) place left-padded rows; ``grad=True`` runs outside
        inference mode so training code can backpropagate; ``logits_to_keep=k``
        computes logits for the last k positions only (0: all)."""
        import contextlib

        import torch

        kwargs: dict[str, Any] = {"output_hidden_states": output_hidden_states, "use_cache": use_cache}
        if cache is not None:
            # transformers >= 5.2x names the KV cache argument ``cache``; older releases ``past_key_values``
            kwargs[self._cache_arg] = cache
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
        if self._cache_arg == "past_key_values" and "past_key_values" in out:
            # an older transformers names the output's cache so too; on newer ones even asking
            # for the old name (``in``, ``[]``, the attribute) warns that it is deprecated
            out.cache = out["past_key_values"]
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
