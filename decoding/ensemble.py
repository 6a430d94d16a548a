"""Ensembles: several experts answer one prompt together, as one System.

Two families, one ``type: ensemble`` in a spec:

- **Answer-level** (``AnswerEnsemble``): every member writes a whole answer.
  ``mode: vote`` keeps the answer most members (by weight) agree on, after
  extracting what each answer says (``answer:``: a number, a choice letter, ...);
  ties go to a named member. ``mode: best_of`` keeps the answer a scorer likes
  best: the mean token log-probability of each answer under a ``judge`` expert,
  or (``judge: self``) under the member that wrote it. Members may be any
  experts, local or remote; they need not share a tokenizer.
- **Token-level** (``TokenEnsemble``): the members decode one answer together,
  one forward per member per step, each with its own KV cache (a
  ``collab.decode.Session``), in the core's decoding loop. ``mode: logits``
  samples from the weighted mixture of the members' next-token distributions;
  ``mode: contrast`` from expert minus lambda x anti-expert (contrastive
  decoding), or with a ``base``, base + lambda x (expert - anti) (proxy-tuning).
  Members must share a tokenizer.

In a spec::

    systems:
      vote:   {type: ensemble, mode: vote, experts: [arith, lists, units], answer: skill}
      table:  {type: ensemble, mode: vote, experts: [smol, arith], weights: {from_table: routing/zoo-dev.jsonl}}
      judged: {type: ensemble, mode: best_of, experts: [arith, lists], judge: smol}   # or judge: self
      mix:    {type: ensemble, mode: logits, experts: [arith, lists], weights: [0.7, 0.3]}
      proxy:  {type: ensemble, mode: contrast, base: arith, expert: lists, anti: smol, lambda: 1.0}

Every completion's trace carries ``cost``: the tokens every model read or wrote
for it (members x tokens), beside the usage of the answer itself. Multiple-choice
benchmarks score an ensemble through ``loglikelihood``: the weighted mean of the
members' log-likelihoods (answer-level), or the exact log-probability under the
combined next-token distribution (token-level).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator, Sequence

from collab.errors import CollabError, RequestError
from collab.system import BaseSystem, Completion, GenerationRequest, RendersRequests, StreamChunk, generate_all, scorer

if TYPE_CHECKING:
    import torch

    from collab.decode import Loop, Session
    from collab.experts import Expert

#: The anchor of answer-level ensembling (rank, then pick or fuse full answers).
reference_url = "https://arxiv.org/abs/2306.02561"
#: Each mode's method.
REFERENCES = {
    "vote": "https://arxiv.org/abs/2203.11171",  # self-consistency: majority over extracted answers
    "best_of": "https://arxiv.org/abs/2306.02561",  # LLM-Blender: score the candidates, keep the best
    "logits": "https://arxiv.org/abs/2105.03023",  # DExperts: combining next-token distributions
    "contrast": "https://arxiv.org/abs/2401.08565",  # proxy-tuning; without a base, contrastive decoding (2210.15097)
}
MODES = ("vote", "best_of", "logits", "contrast")
ANSWER_MODES = ("vote", "best_of")
DEFAULT_LAMBDA = 1.0
DEFAULT_ALPHA = 0.1


class EnsembleError(CollabError, ValueError):
    """An ensemble that cannot be built as configured (names the key, expected vs found)."""


# ------------------------------------------------------------------- answers
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTERED = re.compile(r"^\s*\(?([A-Z])[.)]\s", re.MULTILINE)


def _numbers(text: str) -> list[str]:
    """The numbers written in ``text``, normalised ('12.0' and '12' alike; '1,234' is two
    numbers, as the zoo's skill checker reads lists)."""
    out = []
    for n in _NUMBER.findall(text.replace(",", ", ").replace("\u2212", "-")):
        v = float(n)
        out.append(str(int(v)) if v == int(v) else repr(v))
    return out


def _question(request: GenerationRequest) -> str:
    return request.text_for_routing(last_turn_only=True)


def _exact(text: str, request: GenerationRequest) -> Hashable | None:
    key = " ".join(text.split()).lower().rstrip(".")
    return key or None


def _number(text: str, request: GenerationRequest) -> Hashable | None:
    from evals.benchmarks.gsm8k import extract_last_number

    return extract_last_number(text)


def _first_number(text: str, request: GenerationRequest) -> Hashable | None:
    found = _numbers(text)
    return found[0] if found else None


def _choice(text: str, request: GenerationRequest) -> Hashable | None:
    from evals.benchmarks.base import LETTERS, parse_letter

    letters = _LETTERED.findall(_question(request))
    n = len(letters) if letters else len(LETTERS)
    i = parse_letter(text, n)
    return None if i is None else LETTERS[i]


def _skill(text: str, request: GenerationRequest) -> Hashable | None:
    """What ``collab.skills.check`` compares: the first number, or for a list to sort or
    reverse, the first as many numbers as the question's list has."""
    q = _question(request)
    k = 1
    if re.match(r"\s*(sort|reverse)\b", q, re.IGNORECASE) and ":" in q:
        k = max(1, len(_numbers(q.rsplit(":", 1)[1])))
    found = _numbers(text)
    return tuple(found[:k]) if len(found) >= k else None


#: ``answer:`` in a spec -> how a vote reads an answer: a key (equal keys are the same
#: answer) or None (the member abstains).
ANSWER_EXTRACTORS: dict[str, Callable[[str, GenerationRequest], Hashable | None]] = {
    "exact": _exact,  # the whole text, whitespace collapsed, lower case, no final '.'
    "number": _number,  # the last number (GSM8K's scorer)
    "first_number": _first_number,  # the first number
    "choice": _choice,  # the choice letter (multiple choice answered by generation)
    "skill": _skill,  # the zoo's skill checker: the first number, or the first n of a list
}
DEFAULT_ANSWER = "exact"


def extract_answer(kind: str, text: str, request: GenerationRequest) -> Hashable | None:
    """The answer ``text`` gives to ``request``, read as ``kind`` (a key of ANSWER_EXTRACTORS)."""
    if kind not in ANSWER_EXTRACTORS:
        raise EnsembleError(f"answer: expected one of {', '.join(ANSWER_EXTRACTORS)}, found {kind!r}")
    return ANSWER_EXTRACTORS[kind](text, request)


# ------------------------------------------------------------------- weights
def weights_from_table(path: str | Path, members: Sequence[str], task: str | None = None) -> list[float]:
    """Each member's weight learned from a routing table: its mean score over the
    table's rows (only those of ``task`` when given), i.e. its accuracy there.
    The table must have a score column for every member (by spec name)."""
    import warnings

    from routers.table import TableError, TableWarning, load_table

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TableWarning)  # costs default to 1: weights do not read them
            table = load_table(path)
        missing = [m for m in members if m not in table.experts]
        if missing:
            raise EnsembleError(f"{path}: the table has no scores for '{missing[0]}' (its experts: {', '.join(table.experts)})")
        table = table.select_experts(list(members))
    except TableError as e:
        raise EnsembleError(str(e)) from e
    rows = [i for i, t in enumerate(table.tasks) if task is None or t == task]
    if not rows:
        raise EnsembleError(f"{path}: no rows of task '{task}' (tasks: {', '.join(table.task_names)})")
    means = table.scores[rows].mean(axis=0)
    return [float(x) for x in means]


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _check_weights(weights: Sequence[float] | None, n: int, names: Sequence[str]) -> list[float]:
    if weights is None:
        return [1.0] * n
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise EnsembleError(f"weights: expected {n} (one per expert: {', '.join(names)}), found {len(ws)}")
    if any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
        raise EnsembleError(f"weights: expected numbers >= 0, not all 0, found {ws}")
    return ws


def _cost(by_model: dict[str, int], members: int) -> dict[str, Any]:
    """The trace's ``cost``: tokens each model read or wrote for this answer, and their sum."""
    return {"members": members, "tokens": int(sum(by_model.values())), "by_model": dict(by_model)}


# ------------------------------------------------------------- answer level
@dataclass
class _Scored:
    """One member's answer to one request, as the ensemble judged it."""

    completion: Completion
    key: Hashable | None = None
    score: float | None = None


class AnswerEnsemble(BaseSystem):
    """Answer-level ensemble over ``members`` (any Systems; they need not share a
    tokenizer). ``mode`` is ``vote`` (weighted majority over the answers read as
    ``answer``; ties to ``tie_break``) or ``best_of`` (the answer with the highest mean
    token log-probability under ``judge``, an expert, or ``"self"``: each member's own).
    ``weights`` (default 1 each) weigh the votes and the members' log-likelihoods; a
    member of weight 0 still answers and may break ties. Streaming yields the chosen
    answer once every member has answered."""

    type_key = "ensemble"

    def __init__(
        self,
        members: Sequence[Any],
        mode: str = "vote",
        weights: Sequence[float] | None = None,
        *,
        answer: str = DEFAULT_ANSWER,
        tie_break: str | None = None,
        judge: Any = "self",
        name: str = "ensemble",
    ) -> None:
        if mode not in ANSWER_MODES:
            raise EnsembleError(f"mode: expected one of {', '.join(ANSWER_MODES)} for an answer-level ensemble, found {mode!r}")
        if not members:
            raise EnsembleError("experts: expected at least one member")
        self.members = list(members)
        self.names = [str(m.name) for m in self.members]
        if len(set(self.names)) != len(self.names):
            raise EnsembleError(f"experts: a member is listed twice: {self.names}")
        self.weights = _check_weights(weights, len(self.members), self.names)
        if answer not in ANSWER_EXTRACTORS:
            raise EnsembleError(f"answer: expected one of {', '.join(ANSWER_EXTRACTORS)}, found {answer!r}")
        # preference order: weight, then the order listed; the first is the default tie-breaker
        self.order = sorted(range(len(self.members)), key=lambda i: (-self.weights[i], i))
        if tie_break is not None and tie_break not in self.names:
            raise EnsembleError(f"tie_break: '{tie_break}' is not a member (members: {', '.join(self.names)})")
        self.tie_break = tie_break if tie_break is not None else self.names[self.order[0]]
        self.mode = mode
        self.answer = answer
        self.judge = judge
        self.name = name

    # ------------------------------------------------------------- System
    def generate(self, request: GenerationRequest) -> Completion:
        return self.generate_batch([request])[0]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """The chosen answer in one chunk, once every member has answered."""
        c = self.generate(request)
        yield StreamChunk(text=c.text, finish_reason=c.finish_reason, usage=c.usage, trace=c.trace)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Each member answers every request (batched where it batches); then each
        request's answers are voted on or judged."""
        answers = [generate_all(m, requests) for m in self.members]  # [member][request]
        judged: list[list[float]] | None = None
        judge_tokens = [0] * len(requests)
        if self.mode == "best_of":
            judged, judge_tokens = self._judge_scores(requests, answers)
        out = []
        for r, request in enumerate(requests):
            row = [_Scored(a[r]) for a in answers]
            if judged is not None:
                for j, s in enumerate(row):
                    s.score = judged[j][r]
            out.append(self._choose(request, row, judge_tokens[r]))
        return out

    def _choose(self, request: GenerationRequest, row: list[_Scored], judge_tokens: int) -> Completion:
        trace: dict[str, Any] = {
            "system": self.name,
            "type": self.type_key,
            "mode": self.mode,
            "members": list(self.names),
            "weights": dict(zip(self.names, self.weights)),
        }
        if self.mode == "vote":
            chosen = self._vote(request, row, trace)
        else:
            chosen = self._best(row, trace)
        answers = []
        for name, s in zip(self.names, row):
            a: dict[str, Any] = {"expert": name, "text": s.completion.text}
            if self.mode == "vote":
                a["answer"] = _jsonable(s.key)
            else:
                a["score"] = None if s.score is None or not math.isfinite(s.score) else round(s.score, 6)
            answers.append(a)
        by_model = {n: s.completion.usage.total_tokens for n, s in zip(self.names, row)}
        if self.mode == "best_of":
            judge_name = "self" if self.judge == "self" else str(self.judge.name)
            trace["judge"] = judge_name
            by_model[f"judge:{judge_name}"] = by_model.get(f"judge:{judge_name}", 0) + judge_tokens
        c = row[chosen].completion
        trace.update({"chosen": self.names[chosen], "answers": answers, "cost": _cost(by_model, len(self.members)), "expert_trace": c.trace})
        return Completion(text=c.text, finish_reason=c.finish_reason, usage=c.usage, trace=trace)

    def _vote(self, request: GenerationRequest, row: list[_Scored], trace: dict[str, Any]) -> int:
        """The member whose answer wins: the answer of the largest total weight; among
        tied answers, the tie-breaker's, else the one its most preferred member gave;
        within the answer, the tie-breaker if it gave it, else the most preferred member."""
        for s in row:
            s.key = extract_answer(self.answer, s.completion.text, request)
        totals: dict[Hashable, float] = {}
        for s, w in zip(row, self.weights):
            if s.key is not None:
                totals[s.key] = totals.get(s.key, 0.0) + w
        trace["answer"] = self.answer
        trace["votes"] = [{"answer": _jsonable(k), "weight": round(v, 6)} for k, v in totals.items()]
        tb = self.names.index(self.tie_break)
        if not totals:  # nobody gave a readable answer: the tie-breaker's text
            trace["tie"] = True
            return tb
        best = max(totals.values())
        tied = [k for k, v in totals.items() if math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-12)]
        trace["tie"] = len(tied) > 1
        if row[tb].key in tied:
            return tb
        return next(i for i in self.order if row[i].key in tied)

    def _best(self, row: list[_Scored], trace: dict[str, Any]) -> int:
        """The member with the highest judge score; ties to the tie-breaker, then by preference."""
        scores = [s.score if s.score is not None else -math.inf for s in row]
        best = max(scores)
        tied = [i for i, x in enumerate(scores) if x == best]
        tb = self.names.index(self.tie_break)
        trace["tie"] = len(tied) > 1
        if tb in tied:
            return tb
        return next(i for i in self.order if i in tied)

    def _judge_scores(self, requests: Sequence[GenerationRequest], answers: list[list[Completion]]) -> tuple[list[list[float]], list[int]]:
        """[member][request] mean token log-probability of each answer given the judge's
        rendering of the request (-inf for an empty answer), and per request the tokens
        the judge(s) read."""
        scores = [[-math.inf] * len(requests) for _ in self.members]
        tokens = [0] * len(requests)
        judges = [self.judge] if self.judge != "self" else list(self.members)
        for g, judge in enumerate(judges):
            who = "self" if self.judge == "self" else judge.name
            sc = scorer(judge, f"best_of with judge '{who}'")
            rows = range(len(self.members)) if self.judge != "self" else [g]
            contexts = [_context_for(judge, r) for r in requests]
            pairs, where = [], []
            for j in rows:
                for r in range(len(requests)):
                    text = answers[j][r].text
                    if text:
                        pairs.append((contexts[r], text))
                        where.append((j, r))
            lls = sc.loglikelihood_batch(pairs) if pairs else []
            for (j, r), (ll, _greedy), (_, text) in zip(where, lls, pairs):
                n = _count_tokens(judge, text) or max(1, answers[j][r].usage.completion_tokens)
                scores[j][r] = float(ll) / n
                tokens[r] += n
            for r in {rr for _, rr in where}:  # each context is read once (continuations share it)
                tokens[r] += _count_tokens(judge, contexts[r])
        return scores, tokens

    # ------------------------------------------------------------ scoring
    def loglikelihood(self, context: str, continuation: str) -> float:
        """The weighted mean of the members' log P(continuation | context)."""
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        """Per pair: the weighted mean of the members' summed log-probabilities (a
        geometric pool: members need not share a tokenizer), and whether every member
        of non-zero weight would write the continuation greedily."""
        ws = _normalised(self.weights)
        total = [0.0] * len(pairs)
        greedy = [True] * len(pairs)
        for m, w in zip(self.members, ws):
            if w == 0:
                continue
            got = scorer(m, f"scoring with ensemble '{self.name}'").loglikelihood_batch(pairs, batch_size=batch_size)
            for i, (ll, g) in enumerate(got):
                total[i] += w * float(ll)
                greedy[i] = greedy[i] and bool(g)
        return list(zip(total, greedy))


def _context_for(system: Any, request: GenerationRequest) -> str:
    """The text ``system`` is given for ``request`` (its chat template applied), so an
    answer is scored in the context it answers."""
    if isinstance(system, RendersRequests):
        return system.render(request)
    if request.prompt is not None:
        return request.prompt
    raise RequestError(
        f"best_of: '{system.name}' cannot render a chat request into the text its model reads (e.g. a remote expert), "
        "so it cannot score answers to it; send a raw prompt or judge with a local expert"
    )


def _count_tokens(system: Any, text: str) -> int:
    tok = getattr(system, "tokenizer", None)
    return len(tok(text, add_special_tokens=False).input_ids) if tok is not None and text else 0


def _jsonable(key: Hashable | None) -> Any:
    return list(key) if isinstance(key, tuple) else key


# --------------------------------------------------------------- token level
class TokenEnsemble(BaseSystem):
    """Token-level ensemble: ``models`` (sharing one tokenizer) each keep a KV cache
    and read every chosen token; the first drives the decoding loop (its prompt
    rendering, end-of-sequence tokens and stops). At each step their next-token
    log-probabilities are combined and the token is picked as the request asks
    (greedy, or sampled with its temperature, top-p and seed).

    ``mode="logits"``: ``models`` are the members with ``weights``; the combined
    distribution is the weighted mixture sum_i w_i p_i (probabilities averaged, not
    log-probabilities). ``mode="contrast"``: ``models`` are ``[expert, anti]`` with
    scores log p_expert - lambda log p_anti over the tokens the expert finds plausible
    (p_expert >= alpha max p_expert), or ``[base, expert, anti]`` with
    log p_base + lambda (log p_expert - log p_anti) (proxy-tuning)."""

    type_key = "ensemble"

    def __init__(
        self,
        models: Sequence["Expert"],
        mode: str = "logits",
        weights: Sequence[float] | None = None,
        *,
        lam: float = DEFAULT_LAMBDA,
        alpha: float = DEFAULT_ALPHA,
        name: str = "ensemble",
    ) -> None:
        from decoding.system import check_shared_tokenizer

        if mode not in ("logits", "contrast"):
            raise EnsembleError(f"mode: expected 'logits' or 'contrast' for a token-level ensemble, found {mode!r}")
        if not models:
            raise EnsembleError("experts: expected at least one member")
        if mode == "contrast" and len(models) not in (2, 3):
            raise EnsembleError(f"contrast: expected [expert, anti] or [base, expert, anti], found {len(models)} models")
        if not (math.isfinite(float(lam)) and float(lam) >= 0):
            raise EnsembleError(f"lambda: expected a number >= 0, found {lam!r}")
        if not 0.0 <= float(alpha) < 1.0:
            raise EnsembleError(f"alpha: expected 0 <= alpha < 1, found {alpha!r}")
        self.models = list(models)
        self.names = [m.name for m in self.models]
        check_shared_tokenizer(
            self.models[0], self.models[1:], why=f"ensemble mode '{mode}' combines next-token distributions, so every member needs the same vocabulary"
        )
        self.mode = mode
        self.weights = _check_weights(weights, len(self.models), self.names) if mode == "logits" else [1.0] * len(self.models)
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.roles = self.names if mode == "logits" else ["expert", "anti"] if len(self.models) == 2 else ["base", "expert", "anti"]
        self.name = name

    @property
    def driver(self) -> "Expert":
        return self.models[0]

    def combine(self, logps: Sequence["torch.Tensor"]) -> "torch.Tensor":
        """(B, V) scores the next token is picked from, given each model's (B, V)
        log-probabilities in the order of ``models``."""
        import torch

        if self.mode == "logits":
            log_w = torch.log(torch.tensor(_normalised(self.weights), dtype=logps[0].dtype, device=logps[0].device))
            stacked = torch.stack(list(logps))  # (M, B, V)
            return torch.logsumexp(stacked + log_w[:, None, None], dim=0)
        if len(logps) == 3:  # proxy-tuning
            base, expert, anti = logps
            return base + self.lam * (expert - anti)
        expert, anti = logps
        scores = expert - self.lam * anti
        if self.alpha > 0:  # contrastive decoding's plausibility constraint
            cut = expert.max(dim=-1, keepdim=True).values + math.log(self.alpha)
            scores = scores.masked_fill(expert < cut, float("-inf"))
        return scores

    # ---------------------------------------------------------------- System
    def trace_for(self, request: GenerationRequest) -> dict[str, Any]:
        fmt = "raw" if request.prompt is not None else self.driver.prompt_format
        tr: dict[str, Any] = {"system": self.name, "type": self.type_key, "mode": self.mode, "members": list(self.names), "prompt_format": fmt}
        if self.mode == "logits":
            tr["weights"] = dict(zip(self.names, self.weights))
        else:
            tr.update({"roles": dict(zip(self.roles, self.names)), "lambda": self.lam})
            if len(self.models) == 2:
                tr["alpha"] = self.alpha
        return tr

    def rule(self, requests: Sequence[GenerationRequest]) -> "CombineRule":
        """The decoding rule of one batch of ``requests`` (fresh sessions for the other models)."""
        return CombineRule(self, requests)

    def generate(self, request: GenerationRequest) -> Completion:
        from collab import decode

        return decode.generate(self.driver, request, self.rule([request]), trace=self.trace_for)

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        from collab import decode

        return decode.stream(self.driver, request, self.rule([request]), trace=self.trace_for)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Batches of the driver's ``batch_size``, prompts of similar length together;
        results in the order of ``requests``."""
        from collab import decode

        encoded = [self.driver.encode(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.driver.batch_size):
            chunk = order[start : start + self.driver.batch_size]
            reqs = [requests[i] for i in chunk]
            done = decode.generate_batch(self.driver, reqs, self.rule(reqs), prompts=[encoded[i] for i in chunk], trace=self.trace_for)
            for i, c in zip(chunk, done):
                results[i] = c
        return [c for c in results if c is not None]

    # --------------------------------------------------------------- scoring
    def loglikelihood(self, context: str, continuation: str) -> float:
        """log P(continuation | context) under the combined next-token distribution."""
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> list[tuple[float, bool]]:
        """Per pair: the summed log-probability of the continuation's tokens under the
        distribution the ensemble decodes from (``combine``, normalised at every token),
        and whether each token is that distribution's most likely one. Every model reads
        context and continuation once (a Session per model per batch)."""
        import torch

        split = [self.driver._split_context(c, x) for c, x in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -(len(split[i][0]) + len(split[i][1])))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        bs = batch_size or self.driver.batch_size
        for start in range(0, len(order), bs):
            rows = [i for i in order[start : start + bs] if split[i][1]]
            if not rows:
                continue
            per_model = [_continuation_logits(m, [split[i][0] for i in rows], [split[i][1] for i in rows]) for m in self.models]
            for k, i in enumerate(rows):
                cont = split[i][1]
                logps = [torch.log_softmax(pm[k], dim=-1) for pm in per_model]  # each (n, V)
                scores = torch.log_softmax(self.combine(logps), dim=-1)
                target = torch.tensor(cont, device=scores.device)
                ll = float(scores.gather(1, target[:, None]).sum())
                out[i] = (ll, bool((scores.argmax(dim=-1) == target).all()))
        return out


def _continuation_logits(model: "Expert", contexts: list[list[int]], conts: list[list[int]]) -> list["torch.Tensor"]:
    """Per row, (n, V) float32: ``model``'s logits predicting each of the n continuation
    tokens, from one prefill of the contexts and one pass over the continuations."""
    import torch

    s = model.session(contexts)
    first = s.logits  # (B, V): predicts each continuation's first token
    s.feed(conts, all_logits=True)
    chunk = s.chunk_logits  # (B, W, V), row i's n_i tokens right-aligned
    assert chunk is not None
    width = chunk.shape[1]
    out = []
    for k, c in enumerate(conts):
        n = len(c)
        out.append(torch.cat([first[k : k + 1], chunk[k, width - n : width - 1]], dim=0))
    return out


class CombineRule:
    """The decoding-loop rule of one batch of a TokenEnsemble: ``start`` prefills
    every other model with the prompts; each call feeds them the tokens chosen at
    the previous step, combines the models' log-probabilities and picks each row's
    token as its request asks."""

    def __init__(self, ensemble: TokenEnsemble, requests: Sequence[GenerationRequest]) -> None:
        from collab.decode import RequestRule

        self.ensemble = ensemble
        self.pick = RequestRule(requests)
        self.sessions: list["Session"] = []
        self.steps = [0] * len(requests)
        self.loop: "Loop | None" = None

    def start(self, loop: "Loop") -> None:
        self.loop = loop
        self.sessions = [m.session(loop.prompts) for m in self.ensemble.models[1:]]

    def __call__(self, logits: "torch.Tensor", loop: "Loop") -> Any:
        import torch

        if loop.last is not None:
            for s in self.sessions:
                s.feed(loop.last)
        logps = [torch.log_softmax(logits.float(), dim=-1)] + [torch.log_softmax(s.logits, dim=-1) for s in self.sessions]
        for i, done in enumerate(loop.finished):
            if not done:
                self.steps[i] += 1
        return self.pick(self.ensemble.combine(logps), loop)

    def trace(self, row: int) -> dict[str, Any]:
        """The cost: every model read the prompt and the answer (members x tokens), in
        ``steps`` forward passes each."""
        assert self.loop is not None
        r = self.loop.rows[row]
        per = len(r.prompt) + len(r.gen)
        by_model: dict[str, int] = {}
        for n in self.ensemble.names:  # a model in two roles (proxy-tuning's base = anti) counts twice
            by_model[n] = by_model.get(n, 0) + per
        cost = _cost(by_model, len(self.ensemble.models))
        cost["steps"] = self.steps[row]
        return {"cost": cost}


# ---------------------------------------------------------------------- spec
_MODE_KEYS = {
    "vote": {"experts", "weights", "answer", "tie_break"},
    "best_of": {"experts", "weights", "judge", "tie_break"},
    "logits": {"experts", "weights"},
    "contrast": {"expert", "anti", "base", "lambda", "alpha"},
}


class EnsembleSystemType:
    """``type: ensemble`` in a spec: checks ``mode`` and the keys it takes, the member
    names, weights (numbers, or learned ``from_table``), and builds an AnswerEnsemble
    (vote, best_of) or a TokenEnsemble (logits, contrast)."""

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        mode = config.get("mode")
        if mode not in MODES:
            what = "missing" if mode is None else f"unknown mode {mode!r}"
            raise spec.error(f"{kp}.mode", f"{what}; expected one of {', '.join(MODES)}")
        allowed = {"type", "mode"} | _MODE_KEYS[mode]
        for key in sorted(set(config) - allowed):
            others = [m for m, keys in _MODE_KEYS.items() if key in keys]
            hint = f" ('{key}' belongs to mode {' or '.join(others)})" if others else ""
            raise spec.error(f"{kp}.{key}", f"unknown key for an ensemble of mode '{mode}'{hint}; expected some of {', '.join(sorted(allowed))}")
        token_level = mode in ("logits", "contrast")
        if mode == "contrast":
            names = self.contrast_names(spec, kp, config)
            for key in ("lambda", "alpha"):
                if key in config:
                    v = config[key]
                    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (v >= 0 if key == "lambda" else 0 <= v < 1)
                    if not ok:
                        raise spec.error(f"{kp}.{key}", f"expected {'a number >= 0' if key == 'lambda' else 'a number in [0, 1)'}, found {v!r}")
            return
        names = self.member_names(spec, kp, config, local=token_level)
        self.weights(spec, kp, config, names)
        if "answer" in config and config["answer"] not in ANSWER_EXTRACTORS:
            raise spec.error(f"{kp}.answer", f"expected one of {', '.join(ANSWER_EXTRACTORS)}, found {config['answer']!r}")
        if "tie_break" in config and config["tie_break"] not in names:
            raise spec.error(f"{kp}.tie_break", f"expected one of the members ({', '.join(names)}), found {config['tie_break']!r}")
        judge = config.get("judge", "self")
        if mode == "best_of" and judge != "self":
            if not isinstance(judge, str) or judge not in spec.experts:
                raise spec.error(f"{kp}.judge", f"expected 'self' or an expert of the spec ({', '.join(spec.experts)}), found {judge!r}")

    @staticmethod
    def member_names(spec: Any, kp: str, config: dict[str, Any], local: bool) -> list[str]:
        names = config.get("experts")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise spec.error(f"{kp}.experts", f"expected a non-empty list of expert names, found {names!r}")
        if len(set(names)) != len(names):
            raise spec.error(f"{kp}.experts", f"an expert is listed twice: {names!r}")
        for i, n in enumerate(names):
            _check_expert(spec, f"{kp}.experts[{i}]", n, local)
        return list(names)

    @staticmethod
    def contrast_names(spec: Any, kp: str, config: dict[str, Any]) -> list[str]:
        """[expert, anti] or [base, expert, anti]."""
        names = []
        for key in ("base", "expert", "anti"):
            if key not in config:
                if key == "base":
                    continue
                raise spec.error(f"{kp}.{key}", "missing; mode 'contrast' needs 'expert' and 'anti' (and optionally 'base') as expert names")
            if not isinstance(config[key], str):
                raise spec.error(f"{kp}.{key}", f"expected an expert name, found {config[key]!r}")
            _check_expert(spec, f"{kp}.{key}", config[key], local=True)
            names.append(config[key])
        if config["expert"] == config["anti"]:
            raise spec.error(f"{kp}.anti", f"the anti-expert is the expert itself ('{config['anti']}'); the contrast would be empty")
        return names

    @staticmethod
    def weights(spec: Any, kp: str, config: dict[str, Any], names: list[str]) -> list[float] | None:
        """The weights of ``names`` the spec gives: a list, a mapping by name, or
        ``{from_table: PATH, task: NAME}``; None when absent."""
        if "weights" not in config:
            return None
        w = config["weights"]
        key = f"{kp}.weights"
        if isinstance(w, dict) and "from_table" in w:
            extra = set(w) - {"from_table", "task"}
            if extra:
                raise spec.error(f"{key}.{sorted(extra)[0]}", "unknown key; expected 'from_table' (a routing table) and optionally 'task'")
            path = spec.resolve_path(str(w["from_table"]))
            if not path.is_file():
                raise spec.error(f"{key}.from_table", f"routing table '{w['from_table']}' not found")
            try:
                ws = weights_from_table(path, names, w.get("task"))
            except EnsembleError as e:
                raise spec.error(f"{key}.from_table", str(e)) from e
        elif isinstance(w, dict):
            if set(w) != set(names):
                raise spec.error(key, f"expected a weight for each member ({', '.join(names)}), found {', '.join(map(str, w)) or 'none'}")
            ws = [w[n] for n in names]
        elif isinstance(w, list):
            if len(w) != len(names):
                raise spec.error(key, f"expected {len(names)} weights (one per expert: {', '.join(names)}), found {len(w)}")
            ws = list(w)
        else:
            raise spec.error(key, f"expected a list of numbers, a mapping expert -> number, or {{from_table: PATH}}, found {w!r}")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 for x in ws) or sum(ws) <= 0:
            raise spec.error(key, f"expected numbers >= 0, not all 0, found {ws}")
        return [float(x) for x in ws]

    def build(self, spec: Any, name: str, config: dict[str, Any]) -> AnswerEnsemble | TokenEnsemble:
        kp = f"systems.{name}"
        mode = config["mode"]
        if mode == "contrast":
            models = [spec.expert(n) for n in self.contrast_names(spec, kp, config)]
            lam, alpha = float(config.get("lambda", DEFAULT_LAMBDA)), float(config.get("alpha", DEFAULT_ALPHA))
            return _built(spec, kp, lambda: TokenEnsemble(models, "contrast", lam=lam, alpha=alpha, name=name))
        names = self.member_names(spec, kp, config, local=mode == "logits")
        weights = self.weights(spec, kp, config, names)
        members = [spec.expert(n) for n in names]
        if mode == "logits":
            return _built(spec, kp, lambda: TokenEnsemble(members, "logits", weights, name=name))
        judge = config.get("judge", "self")
        judge_system = "self" if judge == "self" else spec.expert(judge)
        answer, tie_break = config.get("answer", DEFAULT_ANSWER), config.get("tie_break")
        return _built(spec, kp, lambda: AnswerEnsemble(members, mode, weights, answer=answer, tie_break=tie_break, judge=judge_system, name=name))


def _built(spec: Any, kp: str, make: Callable[[], Any]) -> Any:
    """``make()``, with a CollabError (e.g. members without a shared tokenizer) as a
    SpecError naming the spec file and the system."""
    try:
        return make()
    except CollabError as e:
        raise spec.error(kp, str(e)) from e


def _check_expert(spec: Any, key_path: str, name: str, local: bool) -> None:
    if name not in spec.experts:
        raise spec.error(key_path, f"unknown expert '{name}'; defined: {', '.join(spec.experts) or 'none'}")
    if local and spec.experts[name].remote:
        raise spec.error(key_path, f"expert '{name}' is a remote endpoint; token-level ensembles need local models (next-token logits)")

