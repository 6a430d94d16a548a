"""SpeculativeDecoder: a drafter proposes tokens, the verifier checks them in one pass.

Speculative decoding (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192;
Chen et al. 2023, https://arxiv.org/abs/2302.01318) as a System. At every
step a cheap drafter proposes up to gamma tokens; the verifier reads them all in
ONE forward pass (fed as a chunk to its KV cache, with the logits after every
position) and keeps the longest prefix it agrees with, plus one token of its
own. The output is the verifier's: token for token under greedy decoding, and in
distribution when sampling (a drafted token x is kept with probability
min(1, p(x)/q(x)); at the first rejection the token is drawn from
norm(max(0, p - q)); when all are kept a bonus token is drawn from p).

The drafter is another expert with the verifier's tokenizer (its own KV cache,
rolled back to the kept text and caught up in one pass, never recomputed), or
``lookup``: n-gram prompt lookup (Saxena 2023,
https://github.com/apoorvumang/prompt-lookup-decoding), which drafts the tokens
that followed the last n-gram's earlier occurrence in the prompt or the answer
so far, for free; its q is a point mass.

Both drive collab's decoding loop (``collab.decode``), so batches (each row
keeps its own number of tokens per step), stop strings, EOS, ``max_tokens`` and
streaming work as for a plain expert. In a spec::

    systems:
      draft:
        type: speculative
        verifier: smol            # an expert of the spec (local)
        drafter: lookup           # or an expert of the spec with the verifier's tokenizer
        gamma: 8                  # tokens per draft (the most, when adaptive)
        adaptive: true            # per row, from its running acceptance rate
        ngram: 3                  # lookup: the longest n-gram matched

The completion's trace reports drafted and accepted tokens, the acceptance
rate, the verifier's and drafter's forward passes, and the tokens they computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from collab.errors import CollabError
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk

if TYPE_CHECKING:
    import torch

    from collab.decode import Loop, Sampler, Session
    from collab.experts import Expert

reference_url = "https://arxiv.org/abs/2211.17192"
LOOKUP = "lookup"
#: Draft length when the spec gives none: a model drafter costs a forward pass per
#: drafted token, a lookup draft nothing.
DEFAULT_GAMMA = {"model": 4, LOOKUP: 8}
DEFAULT_NGRAM = 3
#: What one drafted token adds to a verifier pass (its column in the chunk), as a
#: share of a one-token pass; the adaptive draft length weighs it.
VERIFY_TOKEN_COST = 0.05
#: How fast the running acceptance rate forgets old rounds (per round).
ACCEPTANCE_DECAY = 0.9


class SpeculativeConfigError(CollabError, ValueError):
    """An option of a speculative decoder with the wrong kind or value; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.detail = message


@dataclass
class SpeculativeConfig:
    """How a SpeculativeDecoder drafts."""

    gamma: int | None = None
    """Tokens per draft; with ``adaptive`` the most a draft may have. Default: 4 for a
    model drafter, 8 for lookup."""
    adaptive: bool = False
    """Choose each row's draft length before every draft from its running acceptance
    rate alpha: the length maximising expected tokens per unit of cost,
    (1 - alpha^(g+1)) / ((1 - alpha) (1 + c g)) (Leviathan et al., section 3.4)."""
    ngram: int = DEFAULT_NGRAM
    """Lookup only: the longest n-gram matched (shorter ones are tried down to 1)."""
    draft_cost: float | None = None
    """c above: the cost of one drafted token as a share of a verifier step. Default:
    the drafter's parameter count over the verifier's, plus 0.05 for the extra column
    the verifier computes; 0.05 for lookup."""

    def __post_init__(self) -> None:
        if self.gamma is not None and (type(self.gamma) is not int or not 1 <= self.gamma <= 64):
            raise SpeculativeConfigError("gamma", f"expected an integer from 1 to 64, found {self.gamma!r}")
        if not isinstance(self.adaptive, bool):
            raise SpeculativeConfigError("adaptive", f"expected true or false, found {self.adaptive!r}")
        if type(self.ngram) is not int or not 1 <= self.ngram <= 16:
            raise SpeculativeConfigError("ngram", f"expected an integer from 1 to 16, found {self.ngram!r}")
        c = self.draft_cost
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= float(c) <= 100.0):
            raise SpeculativeConfigError("draft_cost", f"expected a number from 0 to 100, found {c!r}")


# ------------------------------------------------------------------- drafting
def lookup_draft(seq: Sequence[int], ngram: int, n: int) -> list[int]:
    """Up to ``n`` tokens that followed the earliest earlier occurrence of the last
    k tokens of ``seq``, for k from ``ngram`` down to 1 (as transformers' prompt
    lookup does); empty when no suffix recurs."""
    size = len(seq)
    if n <= 0 or size < 2:
        return []
    for k in range(min(ngram, size - 1), 0, -1):
        tail = list(seq[size - k :])
        first = tail[0]
        for start in range(size - k):
            if seq[start] == first and list(seq[start : start + k]) == tail:
                return list(seq[start + k : start + k + n])
    return []


def best_gamma(alpha: float, cost: float, most: int) -> int:
    """The draft length g in [1, most] that maximises the expected tokens per round,
    (1 - alpha^(g+1)) / (1 - alpha), per unit of cost, 1 + cost * g."""

    def value(g: int) -> float:
        expected = g + 1.0 if alpha >= 1.0 - 1e-9 else (1.0 - alpha ** (g + 1)) / (1.0 - alpha)
        return expected / (1.0 + cost * g)

    return max(range(1, most + 1), key=lambda g: (value(g), -g))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _RowStats:
    """One row's counts, for its trace and its adaptive draft length."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    verifier_passes: int = 0
    verifier_tokens: int = 0
    drafter_passes: int = 0
    drafter_tokens: int = 0
    hits: float = 1.0  # decayed counts of kept and rejected drafted tokens (prior: alpha = 0.5)
    misses: float = 1.0
    lengths: list[int] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        return self.hits / (self.hits + self.misses)

    def record(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            self.lengths.append(drafted)
            self.hits = ACCEPTANCE_DECAY * self.hits + accepted
            self.misses = ACCEPTANCE_DECAY * self.misses + (1.0 if accepted < drafted else 0.0)


# --------------------------------------------------------------------- system
class SpeculativeDecoder(BaseSystem):
    """Speculative decoding of a ``verifier`` expert with a ``drafter`` (an expert with
    the verifier's tokenizer, or ``"lookup"``); a System whose answers are the
    verifier's (greedy: the same tokens; sampled: the same distribution)."""

    type_key = "speculative"

    def __init__(
        self,
        verifier: "Expert",
        drafter: "Expert | str",
        config: SpeculativeConfig | None = None,
        *,
        name: str = "speculative",
    ) -> None:
        from collab.experts import Expert
        from decoding.system import check_shared_tokenizer

        config = config or SpeculativeConfig()
        if not isinstance(verifier, Expert):
            raise CollabError(f"speculative decoding: verifier '{getattr(verifier, 'name', verifier)}' must be a local expert (its logits are read)")
        if isinstance(drafter, str):
            if drafter != LOOKUP:
                raise CollabError(f"speculative decoding: drafter: expected an expert or '{LOOKUP}', found {drafter!r}")
        elif not isinstance(drafter, Expert):
            raise CollabError(f"speculative decoding: drafter '{getattr(drafter, 'name', drafter)}' must be a local expert or '{LOOKUP}'")
        else:
            check_shared_tokenizer(
                verifier, [drafter], why="speculative decoding verifies the drafter's token ids, so the drafter needs the verifier's vocabulary"
            )
            if config.ngram != DEFAULT_NGRAM:
                raise SpeculativeConfigError("ngram", f"applies to the '{LOOKUP}' drafter only; drafter is expert '{drafter.name}'")
        self.name = name
        self.verifier = verifier
        self.drafter = drafter
        self.config = config
        self.gamma = config.gamma or DEFAULT_GAMMA[self.drafter_kind]
        if config.draft_cost is not None:
            self.draft_cost = float(config.draft_cost)
        elif isinstance(drafter, Expert):
            self.draft_cost = _parameters(drafter) / _parameters(verifier) + VERIFY_TOKEN_COST
        else:
            self.draft_cost = VERIFY_TOKEN_COST

    @property
    def drafter_kind(self) -> str:
        return LOOKUP if isinstance(self.drafter, str) else "model"

    @property
    def drafter_name(self) -> str:
        return self.drafter if isinstance(self.drafter, str) else self.drafter.name

    # ---------------------------------------------------------------- System
    def trace_for(self, request: GenerationRequest) -> dict[str, Any]:
        fmt = "raw" if request.prompt is not None else self.verifier.prompt_format
        return {
            "system": self.name,
            "type": self.type_key,
            "verifier": self.verifier.name,
            "drafter": self.drafter_name,
            "gamma": self.gamma,
            "adaptive": self.config.adaptive,
            "prompt_format": fmt,
        }

    def rule(self, requests: Sequence[GenerationRequest]) -> "SpeculativeRule":
        """The decoding rule for one batch of ``requests`` (a fresh drafter session)."""
        return SpeculativeRule(self, requests)

    def generate(self, request: GenerationRequest) -> Completion:
        from collab import decode

        return decode.generate(self.verifier, request, self.rule([request]), trace=self.trace_for)

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        from collab import decode

        return decode.stream(self.verifier, request, self.rule([request]), trace=self.trace_for)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Batches of the verifier's ``batch_size``, prompts of similar length together;
        results in the order of ``requests``."""
        from collab import decode

        encoded = [self.verifier.encode(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.verifier.batch_size):
            chunk = order[start : start + self.verifier.batch_size]
            reqs = [requests[i] for i in chunk]
            done = decode.generate_batch(self.verifier, reqs, self.rule(reqs), prompts=[encoded[i] for i in chunk], trace=self.trace_for)
            for i, c in zip(chunk, done):
                results[i] = c
        return [c for c in results if c is not None]

    # Speculative decoding leaves the verifier's distribution unchanged, so it scores text as the verifier does.
    def render(self, request: GenerationRequest) -> str:
        """The exact text the verifier is given for ``request``."""
        return self.verifier.render(request)

    def loglikelihood(self, context: str, continuation: str) -> float:
        """The verifier's log P(continuation | context)."""
        return self.verifier.loglikelihood(context, continuation)

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        """The verifier's scores of each (context, continuation)."""
        return self.verifier.loglikelihood_batch(pairs, batch_size)

    def loglikelihood_rolling(self, text: str) -> float:
        """The verifier's log P(text)."""
        return self.verifier.loglikelihood_rolling(text)


def _parameters(expert: "Expert") -> int:
    return sum(p.numel() for p in expert.model.parameters())


class SpeculativeRule:
    """The decoding-loop rule of one batch: draft, verify in one pass, keep the agreed prefix.

    The loop's session is the verifier's. Each call catches it up on the token it
    chose last time together with the new draft (one forward pass, logits at every
    position), picks each row's tokens, and drops the rejected drafted tokens from
    the cache row by row; the rule therefore feeds the session itself."""

    feeds_session = True

    def __init__(self, decoder: SpeculativeDecoder, requests: Sequence[GenerationRequest]) -> None:
        from collab.decode import Sampler

        self.decoder = decoder
        self.samplers: list[Sampler | None] = [None if r.greedy else Sampler(r.temperature, r.top_p, r.seed) for r in requests]
        self.stats = [_RowStats() for _ in requests]
        self.draft_session: "Session | None" = None
        self.draft_fed: list[list[int]] = []
        self.loop: "Loop | None" = None

    def start(self, loop: "Loop") -> None:
        from collab.decode import Session

        self.loop = loop
        for st, p in zip(self.stats, loop.prompts):
            st.verifier_passes, st.verifier_tokens = 1, len(p)
        if not isinstance(self.decoder.drafter, str):
            self.draft_session = Session(self.decoder.drafter, loop.prompts)
            self.draft_fed = [list(p) for p in loop.prompts]
            for st, p in zip(self.stats, loop.prompts):
                st.drafter_passes, st.drafter_tokens = 1, len(p)

    def draft_length(self, row: int) -> int:
        """How many tokens row ``row`` drafts next (before the budget cap)."""
        d = self.decoder
        if not d.config.adaptive:
            return d.gamma
        return best_gamma(self.stats[row].alpha, d.draft_cost, d.gamma)

    def __call__(self, logits: "torch.Tensor", loop: "Loop") -> list[list[int]]:
        import torch

        session = loop.session
        known = [p + r.gen for p, r in zip(loop.prompts, loop.rows)]
        active = [r.finish is None for r in loop.rows]
        # a drafted token past the row's last allowed one would be thrown away
        want = [min(self.draft_length(i), r.max_new - len(r.gen) - 1) if a else 0 for i, (r, a) in enumerate(zip(loop.rows, active))]
        drafts, qs = self._draft(known, want)
        before = session.logits  # next-token logits after the last token the verifier saw (the prefill's at step 0)
        pending = [k[n:] if a else [] for k, n, a in zip(known, session.lengths, active)]
        chunks = [p + d for p, d in zip(pending, drafts)]
        if any(chunks):
            session.feed(chunks, all_logits=True)
        out: list[list[int]] = []
        drop = [0] * len(known)
        with torch.inference_mode():
            for i, (chunk, draft) in enumerate(zip(chunks, drafts)):
                if not active[i]:
                    out.append([loop.expert.tokenizer.pad_token_id])
                    continue
                g = len(draft)
                if pending[i]:
                    assert session.chunk_logits is not None
                    dists = session.chunk_logits[i, -(g + 1) :]  # (g+1, V): after the pending token and each drafted one
                elif g:
                    assert session.chunk_logits is not None
                    dists = torch.cat([before[i][None], session.chunk_logits[i, -g:]])
                else:
                    dists = before[i][None]
                k, token = self._verify(i, dists, draft, qs[i])
                drop[i] = g - k
                out.append(draft[:k] + [token])
                st = self.stats[i]
                st.record(g, k)
                if chunk:
                    st.verifier_passes += 1
                    st.verifier_tokens += len(chunk)
        session.drop(drop)
        return out

    # ----------------------------------------------------------- drafting
    def _draft(self, known: list[list[int]], want: list[int]) -> tuple[list[list[int]], list["torch.Tensor | None"]]:
        """Each row's draft (up to ``want[i]`` tokens) and, for sampled rows of a model
        drafter, the (g, V) distributions the drafted tokens were drawn from (None: a
        point mass on each drafted token)."""
        if isinstance(self.decoder.drafter, str):
            n = self.decoder.config.ngram
            return [lookup_draft(k, n, w) if w > 0 else [] for k, w in zip(known, want)], [None] * len(known)
        return self._draft_model(known, want)

    def _draft_model(self, known: list[list[int]], want: list[int]) -> tuple[list[list[int]], list["torch.Tensor | None"]]:
        import torch

        session = self.draft_session
        assert session is not None, "SpeculativeRule.start was not called"
        batch = len(known)
        # roll the drafter back to the text the verifier kept, then catch it up on the rest in one pass
        drop: list[int] = [0] * batch
        missing: list[list[int]] = [[] for _ in range(batch)]
        for i in range(batch):
            if want[i] > 0:
                fed = self.draft_fed[i]
                c = _common_prefix(fed, known[i])
                drop[i], missing[i] = len(fed) - c, known[i][c:]
                del fed[c:]
        session.drop(drop)
        eos = frozenset(self.decoder.drafter.eos_token_ids)
        device = self.decoder.verifier.device
        drafts: list[list[int]] = [[] for _ in range(batch)]
        probs: list[list["torch.Tensor"]] = [[] for _ in range(batch)]
        feed = missing
        for step in range(max(want, default=0)):
            if any(feed):
                session.feed(feed)
                for i, f in enumerate(feed):
                    if f:
                        self.draft_fed[i].extend(f)
                        self.stats[i].drafter_passes += 1
                        self.stats[i].drafter_tokens += len(f)
            logits = session.logits.to(device)  # q and p meet on the verifier's device
            feed = [[] for _ in range(batch)]
            with torch.inference_mode():
                for i in range(batch):
                    if len(drafts[i]) != step or step >= want[i]:
                        continue  # not drafting, done, or stopped at an end-of-sequence token
                    sampler = self.samplers[i]
                    if sampler is None:
                        token = int(logits[i].argmax())
                    else:
                        q = sampler.probs(logits[i])
                        token = sampler.draw(q)
                        probs[i].append(q)
                    drafts[i].append(token)
                    if step + 1 < want[i] and token not in eos:
                        feed[i] = [token]
        qs = [torch.stack(p) if p else None for p in probs]
        return drafts, qs

    # ---------------------------------------------------------- verifying
    def _verify(self, row: int, dists: "torch.Tensor", draft: list[int], q: "torch.Tensor | None") -> tuple[int, int]:
        """How many drafted tokens row ``row`` keeps, and the verifier's token after
        them. ``dists`` (g+1, V) are the verifier's logits before each drafted token
        and after the last; ``q`` (g, V) the drafter's distributions (None: point masses)."""
        import torch

        sampler = self.samplers[row]
        g = len(draft)
        if sampler is None:
            best = dists.argmax(dim=-1).tolist()
            k = 0
            while k < g and draft[k] == best[k]:
                k += 1
            return k, best[k]
        p = sampler.probs(dists)  # (g+1, V)
        gen = sampler.rng(p.device)
        for k, x in enumerate(draft):
            px = float(p[k, x])
            qx = 1.0 if q is None else float(q[k, x])
            u = float(torch.rand((), generator=gen, device=p.device))
            if u * qx < px:  # u < p(x) / q(x): keep x
                continue
            if q is None:
                residual = p[k].clone()
                residual[x] = 0.0
            else:
                residual = (p[k] - q[k]).clamp(min=0.0)
            total = float(residual.sum())
            # p <= q everywhere cannot reject in exact arithmetic; rounding may, then p is the answer
            return k, sampler.draw(residual / total if total > 0.0 else p[k])
        return g, sampler.draw(p[g])

    # -------------------------------------------------------------- trace
    def trace(self, row: int) -> dict[str, Any]:
        """Drafted and accepted tokens, the acceptance rate, forward passes and what they computed."""
        st = self.stats[row]
        completion = len(self.loop.rows[row].gen) if self.loop is not None else 0
        trace: dict[str, Any] = {
            "drafted": st.drafted,
            "accepted": st.accepted,
            "acceptance_rate": round(st.accepted / st.drafted, 4) if st.drafted else None,
            "rounds": st.rounds,
            "verifier_passes": st.verifier_passes,
            "tokens_per_verifier_pass": round(completion / st.verifier_passes, 4) if st.verifier_passes else None,
            "mean_draft_length": round(sum(st.lengths) / len(st.lengths), 3) if st.lengths else 0.0,
            "cost": {
                "verifier_passes": st.verifier_passes,
                "verifier_tokens": st.verifier_tokens,
                "drafter_passes": st.drafter_passes,
                "drafter_tokens": st.drafter_tokens,
            },
        }
        return trace


# ----------------------------------------------------------------------- spec
class SpeculativeSystemType:
    """``type: speculative`` in a spec: checks the keys and experts, and builds a
    SpeculativeDecoder (the tokenizers are compared once the experts are loaded)."""

    keys = {"type", "verifier", "drafter", "gamma", "adaptive", "ngram", "draft_cost"}
    options = ("gamma", "adaptive", "ngram", "draft_cost")

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        spec.reject_unknown_keys(config, kp, "speculative", self.keys)
        for key in ("verifier", "drafter"):
            value = config.get(key)
            if not isinstance(value, str):
                what = "a local expert" if key == "verifier" else f"a local expert or '{LOOKUP}'"
                raise spec.error(f"{kp}.{key}", f"missing or not a name; expected the name of {what}, found {value!r}")
        if LOOKUP in spec.experts and config["drafter"] == LOOKUP:
            raise spec.error(f"{kp}.drafter", f"'{LOOKUP}' names prompt-lookup drafting, and also an expert of this spec; rename the expert")
        self._local_expert(spec, f"{kp}.verifier", config["verifier"])
        if config["drafter"] != LOOKUP:
            self._local_expert(spec, f"{kp}.drafter", config["drafter"])
            if "ngram" in config:
                raise spec.error(f"{kp}.ngram", f"applies to 'drafter: {LOOKUP}' only; drafter is expert '{config['drafter']}'")
        self.config(spec, kp, config)

    def config(self, spec: Any, kp: str, config: dict[str, Any]) -> SpeculativeConfig:
        """The SpeculativeConfig of a spec entry; SpecError naming the key if an option is wrong."""
        try:
            return SpeculativeConfig(**{k: config[k] for k in self.options if k in config})
        except SpeculativeConfigError as e:
            raise spec.error(f"{kp}.{e.key}", e.detail) from e

    @staticmethod
    def _local_expert(spec: Any, key_path: str, name: str) -> None:
        if name not in spec.experts:
            raise spec.error(key_path, f"unknown expert '{name}'; defined: {', '.join(spec.experts) or 'none'}")
        if spec.experts[name].remote:
            raise spec.error(key_path, f"expert '{name}' is a remote endpoint; speculative decoding needs local models (logits and KV caches)")

    def build(self, spec: Any, name: str, config: dict[str, Any]) -> SpeculativeDecoder:
        kp = f"systems.{name}"
        verifier = spec.expert(config["verifier"])
        drafter = LOOKUP if config["drafter"] == LOOKUP else spec.expert(config["drafter"])
        try:
            return SpeculativeDecoder(verifier, drafter, self.config(spec, kp, config), name=name)
        except CollabError as e:
            raise spec.error(f"{kp}.drafter", str(e)) from e
