"""CoLLMDecoder: a base model that lets domain experts write the tokens it defers.

Co-LLM (Shen et al. 2024, https://arxiv.org/abs/2403.03870) as a System. The
base expert drives collab's decoding loop; at every step the deferral head reads
the base's last hidden state and gives g_t = P(Z_t != base). Where g_t exceeds
the threshold eta the assistant with the largest P(Z_t = j) writes the token,
else the base does; either way the token is chosen as the request asks (greedy,
or sampled with its temperature, top-p and seed) from the writer's logits.

Every model keeps its KV cache. An assistant is prefilled only when it is first
consulted, and an assistant consulted after several tokens it did not see
catches up on them in one forward pass; its prefix is never recomputed.

In a spec::

    systems:
      duet:
        type: codecode
        base: smol                    # an expert of the spec (local)
        assistants: [arith, lists]    # or  assistant: arith
        head: artefacts/colm-head     # the directory `collab decode train` wrote
        threshold: 0.5                # eta: defer where g_t > eta (0 always, 1 never)

The completion's trace records, per decoding step, the token, who wrote it and
g_t, and sums them up: the deferral rate and each expert's token count.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from collab.errors import CollabError
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk
from decoding.artefact import HeadError, read_config

if TYPE_CHECKING:
    import torch

    from collab.decode import Loop, Session
    from collab.experts import Expert
    from decoding.head import DeferralHead

reference_url = "https://arxiv.org/abs/2403.03870"
DEFAULT_THRESHOLD = 0.5


class TokenizerMismatchError(CollabError):
    """Experts that do not share one tokenizer, which token-level co-decoding needs."""


def _vocab_summary(expert: "Expert") -> str:
    tok = expert.tokenizer
    source = getattr(tok, "name_or_path", "") or type(tok).__name__
    return f"expert '{expert.name}' ({len(tok)} tokens, {source}, output size {_output_size(expert)})"


def _output_size(expert: "Expert") -> int:
    return int(expert.model.get_output_embeddings().weight.shape[0])


def check_shared_tokenizer(
    base: "Expert", assistants: Sequence["Expert"], why: str = "Co-LLM interleaves tokens, so every assistant needs the base's vocabulary"
) -> None:
    """TokenizerMismatchError naming both vocabularies unless every assistant has the
    base's tokenizer (the same token -> id map and special tokens) and LM-head size;
    ``why`` ends the message: what the caller needs a shared vocabulary for."""
    vocab = base.tokenizer.get_vocab()
    for a in assistants:
        same = a.tokenizer.get_vocab() == vocab and _output_size(a) == _output_size(base)
        if not same:
            raise TokenizerMismatchError(f"{_vocab_summary(base)} and {_vocab_summary(a)} do not share a tokenizer; {why}")


def final_hidden_state(expert: "Expert", hidden: "torch.Tensor", logits: "torch.Tensor") -> None:
    """Raise CollabError unless ``hidden`` (the last entry of a forward's hidden states)
    is the tensor the LM head turns into ``logits``: the deferral head must read the
    same final-norm output the paper's ``<|defer|>`` row does."""
    import torch

    with torch.inference_mode():
        head = expert.model.get_output_embeddings()
        recomputed = head(hidden.to(head.weight.dtype)).float()
        cap = getattr(expert.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            recomputed = torch.tanh(recomputed / cap) * cap
    if not torch.allclose(recomputed, logits.float(), atol=1e-3, rtol=1e-3):
        raise CollabError(
            f"expert '{expert.name}': its last hidden state is not what its LM head reads "
            f"(largest difference {float((recomputed - logits.float()).abs().max()):.3g}); "
            "the deferral head needs the final-norm output"
        )


class CoLLMDecoder(BaseSystem):
    """Co-LLM over a ``base`` expert, ``assistants`` (same tokenizer) and a trained
    ``head``; a System. ``threshold`` is eta in [0, 1]. ``base_adapter`` is the LoRA
    directory of a head trained with ``train_base="lora"``: it is merged into a copy
    of the base, so the base expert itself (also a system of the spec) is unchanged."""

    type_key = "codecode"
    #: The rule class each batch gets (``decoding.reference.NaiveDeferralRule`` in benchmarks).
    rule_type: type["DeferralRule"]

    def __init__(
        self,
        base: "Expert",
        assistants: Sequence["Expert"],
        head: "DeferralHead",
        threshold: float = DEFAULT_THRESHOLD,
        *,
        name: str = "codecode",
        base_adapter: Path | None = None,
    ) -> None:
        if not assistants:
            raise ValueError("CoLLMDecoder: assistants: expected at least one expert")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"CoLLMDecoder: threshold: expected 0 <= eta <= 1, found {threshold!r}")
        check_shared_tokenizer(base, assistants)
        if head.n_assistants != len(assistants):
            raise HeadError(f"the deferral head was trained for {head.n_assistants} assistant(s); {len(assistants)} given")
        hidden = int(base.model.config.get_text_config().hidden_size)
        if head.hidden_size != hidden:
            raise HeadError(f"the deferral head reads hidden states of size {head.hidden_size}; base '{base.name}' has {hidden}")
        self.name = name
        self.base = _with_adapter(base, base_adapter) if base_adapter is not None else base
        self.base_adapter = base_adapter
        self.assistants = list(assistants)
        self.head = head.eval()
        self.threshold = float(threshold)
        self.names = [base.name] + [a.name for a in assistants]
        self._checked_hidden = False

    @classmethod
    def load(
        cls,
        head_dir: str | Path,
        base: "Expert",
        assistants: Sequence["Expert"],
        threshold: float = DEFAULT_THRESHOLD,
        *,
        name: str = "codecode",
    ) -> "CoLLMDecoder":
        """A co-decoder from the directory ``collab decode train`` wrote."""
        from decoding.artefact import load_head

        head, _config, adapter = load_head(head_dir)
        return cls(base, assistants, head, threshold, name=name, base_adapter=adapter)

    # ---------------------------------------------------------------- System
    def trace_for(self, request: GenerationRequest) -> dict[str, Any]:
        fmt = "raw" if request.prompt is not None else self.base.prompt_format
        return {
            "system": self.name,
            "type": self.type_key,
            "base": self.base.name,
            "assistants": [a.name for a in self.assistants],
            "threshold": self.threshold,
            "base_adapter": self.base_adapter is not None,
            "prompt_format": fmt,
        }

    def rule(self, requests: Sequence[GenerationRequest]) -> "DeferralRule":
        """The decoding rule for one batch of ``requests`` (fresh assistant sessions)."""
        return self.rule_type(self, requests)

    def generate(self, request: GenerationRequest) -> Completion:
        from collab import decode

        return decode.generate(self.base, request, self.rule([request]), trace=self.trace_for)

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        from collab import decode

        return decode.stream(self.base, request, self.rule([request]), trace=self.trace_for)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Batches of the base's ``batch_size``, prompts of similar length together;
        results in the order of ``requests``."""
        from collab import decode

        encoded = [self.base.encode(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.base.batch_size):
            chunk = order[start : start + self.base.batch_size]
            reqs = [requests[i] for i in chunk]
            done = decode.generate_batch(self.base, reqs, self.rule(reqs), prompts=[encoded[i] for i in chunk], trace=self.trace_for)
            for i, c in zip(chunk, done):
                results[i] = c
        return [c for c in results if c is not None]

    def check_hidden_states(self, out_hidden: "torch.Tensor", logits: "torch.Tensor") -> None:
        """Once per decoder: the base's last hidden state is what its LM head reads."""
        if not self._checked_hidden:
            final_hidden_state(self.base, out_hidden, logits)
            self._checked_hidden = True


class DeferralRule:
    """The decoding-loop rule of one batch: who writes each token, then the token.

    ``start`` makes the base's session keep hidden states; each call reads the
    head on the base's last hidden state, consults the assistants of the rows
    that defer (catching each up on the tokens it missed, in one pass), and
    picks every row's token from its writer's logits as its request asks."""

    def __init__(self, decoder: CoLLMDecoder, requests: Sequence[GenerationRequest]) -> None:
        from collab.decode import RequestRule

        self.decoder = decoder
        self.pick = RequestRule(requests)
        self.sessions: list["Session | None"] = [None] * len(decoder.assistants)
        self.steps: list[list[tuple[int, int, float]]] = [[] for _ in requests]  # per row: (token, writer, g)

    def start(self, loop: "Loop") -> None:
        session = loop.session
        if session.hidden is None:
            # The loop prefilled without hidden states: recompute each row's last prompt
            # token with them (one token per row; the prompt is not recomputed).
            session.hidden_states = True
            session.crop(session.mask.shape[1] - 1)
            session.feed([p[-1] for p in loop.prompts])
        assert session.hidden is not None
        self.decoder.check_hidden_states(session.hidden[-1], session.logits)

    def __call__(self, logits: "torch.Tensor", loop: "Loop") -> Any:
        import torch

        from decoding.head import choose_writers, deferral_probability

        hidden = loop.session.hidden
        assert hidden is not None, "DeferralRule.start was not called"
        with torch.inference_mode():
            log_pz = self.decoder.head.log_probs(hidden[-1])  # (B, k+1)
        g = deferral_probability(log_pz).tolist()
        writers = choose_writers(log_pz, self.decoder.threshold).tolist()
        finished = loop.finished
        writers = [0 if done else w for w, done in zip(writers, finished)]
        chosen = logits
        for j in range(1, len(self.decoder.assistants) + 1):
            rows = [i for i, w in enumerate(writers) if w == j]
            if rows:
                assistant_logits = self._consult(j - 1, rows, loop)
                if chosen is logits:
                    chosen = logits.clone()
                chosen[rows] = assistant_logits[rows].to(chosen.dtype)
        tokens = self.pick(chosen, loop)
        tokens = tokens.tolist() if hasattr(tokens, "tolist") else [int(t) for t in tokens]
        for i, done in enumerate(finished):
            if not done:
                self.steps[i].append((int(tokens[i]), writers[i], float(g[i])))
        return tokens

    def _consult(self, j: int, rows: list[int], loop: "Loop") -> "torch.Tensor":
        """Assistant ``j``'s next-token logits (B, V), current for ``rows``: prefilled at
        its first call (every row's prompt and tokens so far, in one pass), afterwards
        fed only the tokens each of ``rows`` missed."""
        from collab.decode import Session

        known = [p + g for p, g in zip(loop.prompts, loop.generated)]
        session = self.sessions[j]
        if session is None:
            session = self.sessions[j] = Session(self.decoder.assistants[j], known)
            return session.logits
        wanted = set(rows)
        chunks = [known[i][session.lengths[i] :] if i in wanted else [] for i in range(len(known))]
        return session.feed(chunks)

    def trace(self, row: int) -> dict[str, Any]:
        """Per step: the token, who wrote it and g_t; then the deferral rate and
        each expert's token count (the end-of-sequence token is a step too)."""
        tok = self.decoder.base.tokenizer
        names = self.decoder.names
        steps = self.steps[row]
        counts = {n: 0 for n in names}
        for _, w, _ in steps:
            counts[names[w]] += 1
        deferred = sum(1 for _, w, _ in steps if w > 0)
        return {
            "deferral_rate": round(deferred / len(steps), 4) if steps else 0.0,
            "tokens_by_expert": counts,
            "tokens": [{"id": t, "text": tok.decode([t]), "by": names[w], "g": round(g, 6)} for t, w, g in steps],
        }


def _with_adapter(base: "Expert", adapter_dir: Path) -> "Expert":
    """A copy of ``base`` with the LoRA in ``adapter_dir`` merged in (the original is untouched)."""
    import copy
    import warnings

    from collab.experts import Expert

    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - peft comes with the zoo extra
        raise HeadError(f"{adapter_dir}: a head trained with --train-base lora needs peft (pip install peft)") from e
    model = copy.deepcopy(base.model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return Expert(merged, base.tokenizer, name=base.name, prompt_format=base.prompt_format, ref=base.ref, batch_size=base.batch_size)


# ----------------------------------------------------------------------- spec
class CoDecoderSystemType:
    """``type: codecode`` in a spec: checks the keys, the experts and the head
    directory against each other, and builds a CoLLMDecoder."""

    keys = {"type", "base", "assistant", "assistants", "head", "threshold"}

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        spec.reject_unknown_keys(config, kp, "codecode", self.keys)
        base = config.get("base")
        if not isinstance(base, str):
            raise spec.error(f"{kp}.base", f"missing or not a name; expected the name of a local expert, found {base!r}")
        self._local_expert(spec, f"{kp}.base", base)
        assistants = self.assistant_names(spec, kp, config)
        for i, a in enumerate(assistants):
            self._local_expert(spec, f"{kp}.{'assistant' if 'assistant' in config else f'assistants[{i}]'}", a)
        if "threshold" in config:
            t = config["threshold"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
                raise spec.error(f"{kp}.threshold", f"expected a number from 0 (always defer) to 1 (never), found {t!r}")
        head_dir = spec.require_dir(config, "head", kp)
        try:
            hc = read_config(head_dir)
        except HeadError as e:
            raise spec.error(f"{kp}.head", str(e)) from e
        if hc.n_assistants != len(assistants):
            trained = ", ".join(str(a.get("name")) for a in hc.assistants)
            raise spec.error(
                f"{kp}.assistants",
                f"the head '{config['head']}' was trained for {hc.n_assistants} assistant(s) ({trained}); {len(assistants)} given ({', '.join(assistants)})",
            )
        pairs = [("base", base, hc.base)] + [(f"assistants[{i}]", a, t) for i, (a, t) in enumerate(zip(assistants, hc.assistants))]
        for key, spec_name, trained in pairs:
            ref, trained_ref = spec.experts[spec_name].ref, str(trained.get("ref"))
            if ref.startswith("zoo:") and trained_ref.startswith("zoo:") and ref != trained_ref:
                raise spec.error(
                    f"{kp}.{key}",
                    f"expert '{spec_name}' is {ref}, but the head '{config['head']}' was trained with {trained_ref} in this place",
                )

    @staticmethod
    def assistant_names(spec: Any, kp: str, config: dict[str, Any]) -> list[str]:
        if ("assistant" in config) == ("assistants" in config):
            raise spec.error(kp, "expected exactly one of 'assistant' (a name) or 'assistants' (a list of names)")
        if "assistant" in config:
            if not isinstance(config["assistant"], str):
                raise spec.error(f"{kp}.assistant", f"expected the name of a local expert, found {config['assistant']!r}")
            return [config["assistant"]]
        names = config["assistants"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise spec.error(f"{kp}.assistants", f"expected a non-empty list of expert names, found {names!r}")
        if len(set(names)) != len(names):
            raise spec.error(f"{kp}.assistants", f"an expert is listed twice: {names!r}")
        return list(names)

    @staticmethod
    def _local_expert(spec: Any, key_path: str, name: str) -> None:
        if name not in spec.experts:
            raise spec.error(key_path, f"unknown expert '{name}'; defined: {', '.join(spec.experts) or 'none'}")
        if spec.experts[name].remote:
            raise spec.error(key_path, f"expert '{name}' is a remote endpoint; co-decoding needs local models (logits and hidden states)")

    def build(self, spec: Any, name: str, config: dict[str, Any]) -> CoLLMDecoder:
        kp = f"systems.{name}"
        base = spec.expert(config["base"])
        assistants = [spec.expert(a) for a in self.assistant_names(spec, kp, config)]
        try:
            return CoLLMDecoder.load(
                spec.resolve_path(config["head"]), base, assistants, float(config.get("threshold", DEFAULT_THRESHOLD)), name=name
            )
        except CollabError as e:
            raise spec.error(kp, str(e)) from e


CoLLMDecoder.rule_type = DeferralRule

#: The class name the design uses for the spec type.
CoDecoder = CoLLMDecoder
