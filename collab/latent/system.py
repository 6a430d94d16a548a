"""MixtureOfThoughts: frozen heterogeneous experts that read each other's hidden states.

Mixture of Thoughts (Fein-Ashley et al. 2025, https://arxiv.org/abs/2509.21164)
as a System. For each query the router (an MLP over a frozen sentence embedding)
scores the experts; the top-K are active and the best of them is the primary.
Each peer reads the prompt once, in its own tokenisation and prompt format, and
its hidden states at the end of each of its Q stacks are projected into the
shared latent space and kept. The primary then drives collab's decoding loop
with its own KV cache; at the end of each of its stacks an interaction layer
cross-attends to the peers' kept states and adds the result, through a gate, to
its residual stream. Generation is one pass: peers are not run again for the
generated tokens (they read the query; the primary writes the answer).

In a spec::

    systems:
      mot:
        type: latent
        checkpoint: artefacts/mot     # the directory `collab latent train` wrote
        experts: [smol, gemma]        # the spec's experts, in the order trained
        top_k: 2                      # optional: active experts per query (default: as trained)

The trace names the active experts, the primary and every expert's router score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from collab.errors import CollabError
from collab.latent.artefact import LatentArtefactError, LatentConfig, read_config
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk

if TYPE_CHECKING:
    import torch

    from collab.experts import Expert
    from collab.latent.model import Interactions, Memory
    from collab.latent.router import LatentRouter, QueryEncoder

reference_url = "https://arxiv.org/abs/2509.21164"


@dataclass
class Routing:
    """One query's routing: every expert's score, the active experts (the primary
    first) and their weights (a softmax over the active scores)."""

    scores: list[float]
    active: list[int]
    weights: list[float]

    @property
    def primary(self) -> int:
        return self.active[0]

    @property
    def peers(self) -> list[tuple[int, float]]:
        return [(m, w) for m, w in zip(self.active[1:], self.weights[1:])]


def route_scores(scores: "torch.Tensor", k: int) -> list[Routing]:
    """Routings from router scores (B, M): top-``k`` active, the best the primary."""
    import torch

    from collab.latent.router import select

    out = []
    for row, active in zip(scores.detach().float(), select(scores, k)):
        w = torch.softmax(row[active], dim=-1).tolist()
        out.append(Routing([float(s) for s in row], list(active), w))
    return out


class AttachedPrimary:
    """The primary expert as collab's decoding loop sees it: every forward pass
    (prefill and each step) runs with its interaction layers attached to the
    peers' memory; everything else is the expert's own."""

    def __init__(self, expert: "Expert", interactions: "Interactions", index: int, memory: "Memory") -> None:
        self.expert = expert
        self.interactions = interactions
        self.index = index
        self.memory = memory
        self.name = expert.name
        self.model = expert.model
        self.tokenizer = expert.tokenizer
        self.eos_token_ids = expert.eos_token_ids
        self.prompt_format = expert.prompt_format

    @property
    def device(self) -> "torch.device":
        return self.expert.device

    def encode(self, request: GenerationRequest) -> list[int]:
        return self.expert.encode(request)

    def stops_for(self, request: GenerationRequest) -> list[str]:
        return self.expert.stops_for(request)

    def max_new_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        return self.expert.max_new_tokens(request, prompt_len)

    def trace_for(self, request: GenerationRequest) -> dict[str, Any]:
        return self.expert.trace_for(request)

    def forward(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor | None" = None, cache: Any = None, output_hidden_states: bool = False, use_cache: bool = True, **kw: Any) -> Any:
        from collab.latent.model import attached

        m = self.index
        with attached(self.expert, self.interactions.layers[m], self.interactions.cuts[m], self.memory):
            return self.expert.forward(input_ids, attention_mask, cache, output_hidden_states, use_cache, **kw)


class MixtureOfThoughts(BaseSystem):
    """Mixture of Thoughts over ``experts`` (local, in the order the checkpoint was
    trained) with a trained ``router`` and ``interactions``; a System and a Scorer.
    ``top_k`` overrides the trained number of active experts (1: plain routing)."""

    type_key = "latent"

    def __init__(
        self,
        experts: Sequence["Expert"],
        router: "LatentRouter",
        interactions: "Interactions",
        config: LatentConfig,
        *,
        encoder: "QueryEncoder | None" = None,
        name: str = "latent",
        top_k: int | None = None,
    ) -> None:
        from collab.latent.model import expert_shape
        from collab.latent.router import make_encoder

        if len(experts) != len(config.experts):
            raise LatentArtefactError(
                f"the mixture was trained with {len(config.experts)} experts ({', '.join(config.names)}); {len(experts)} given"
            )
        for i, (e, trained) in enumerate(zip(experts, config.experts)):
            hidden, layers = expert_shape(e)
            if (hidden, layers) != (int(trained["hidden_size"]), int(trained["layers"])):
                raise LatentArtefactError(
                    f"expert {i} '{e.name}' has hidden size {hidden} and {layers} layers; the mixture was trained with "
                    f"'{trained['name']}' ({trained.get('ref')}: hidden size {trained['hidden_size']}, {trained['layers']} layers) in this place"
                )
        k = int(top_k if top_k is not None else config.top_k)
        if not 1 <= k <= len(experts):
            raise CollabError(f"top_k: expected 1 <= K <= {len(experts)} (the number of experts), found {k!r}")
        self.name = name
        self.experts = list(experts)
        self.config = config
        self.top_k = k
        device = experts[0].device
        self.router = router.eval().requires_grad_(False).to(device)
        self.interactions = interactions.eval().requires_grad_(False).to(device)
        self.encoder = encoder or make_encoder(config.encoder)

    @classmethod
    def load(cls, path: str | Path, experts: Sequence["Expert"], *, name: str = "latent", top_k: int | None = None, encoder: "QueryEncoder | None" = None) -> "MixtureOfThoughts":
        """A mixture from the directory ``collab latent train`` wrote."""
        from collab.latent.artefact import load_mixture

        router, interactions, config = load_mixture(path)
        return cls(experts, router, interactions, config, encoder=encoder, name=name, top_k=top_k)

    # --------------------------------------------------------------- routing
    def route(self, texts: Sequence[str]) -> list[Routing]:
        """The routing of each query text."""
        import torch

        z = self.encoder.encode(list(texts))
        with torch.inference_mode():
            scores = self.router(z.to(next(self.router.parameters()).device))
        return route_scores(scores, self.top_k)

    def _memory(self, routings: Sequence[Routing], peer_prompts: Sequence[Sequence[list[int]]]) -> "Memory | None":
        """The primary batch's memory; ``peer_prompts[b][j]`` is row b's j-th peer's prompt ids."""
        from collab.latent.model import build_memory

        if self.top_k == 1:
            return None
        rows = [[(m, w, ids) for (m, w), ids in zip(r.peers, prompts)] for r, prompts in zip(routings, peer_prompts)]
        return build_memory(self.interactions, self.experts, rows)

    def trace_of(self, routing: Routing, request: GenerationRequest | None = None) -> dict[str, Any]:
        """What the mixture did for one query: active experts, primary, router scores."""
        primary = self.experts[routing.primary]
        tr: dict[str, Any] = {
            "system": self.name,
            "type": self.type_key,
            "primary": primary.name,
            "experts": [self.experts[m].name for m in routing.active],
            "weights": {self.experts[m].name: round(w, 6) for m, w in zip(routing.active, routing.weights)},
            "router_scores": {e.name: round(s, 6) for e, s in zip(self.experts, routing.scores)},
            "top_k": self.top_k,
        }
        if request is not None:
            tr["prompt_format"] = "raw" if request.prompt is not None else primary.prompt_format
        return tr

    # ---------------------------------------------------------------- System
    def _driver(self, routings: Sequence[Routing], requests: Sequence[GenerationRequest]) -> Any:
        """The expert the loop drives for rows that share one primary: the expert
        itself at K=1, else the expert with its interaction layers attached."""
        m = routings[0].primary
        memory = self._memory(routings, [[self.experts[j].encode(r) for j, _ in rt.peers] for rt, r in zip(routings, requests)])
        return self.experts[m] if memory is None else AttachedPrimary(self.experts[m], self.interactions, m, memory)

    def _tracer(self, routings: Sequence[Routing], requests: Sequence[GenerationRequest]) -> Any:
        by_id = {id(r): rt for r, rt in zip(requests, routings)}
        return lambda request: self.trace_of(by_id[id(request)], request)

    def generate(self, request: GenerationRequest) -> Completion:
        return self.generate_batch([request])[0]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        import torch

        from collab import decode

        with torch.inference_mode():
            routings = self.route([request.text_for_routing()])
            driver = self._driver(routings, [request])
        yield from decode.stream(driver, request, trace=self._tracer(routings, [request]))

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Requests with the same primary are decoded together (in batches of the
        primary's ``batch_size``); results in the order of ``requests``."""
        import torch

        from collab import decode

        if not requests:
            return []
        routings = self.route([r.text_for_routing() for r in requests])
        results: list[Completion | None] = [None] * len(requests)
        for m in sorted({rt.primary for rt in routings}):
            idx = [i for i, rt in enumerate(routings) if rt.primary == m]
            step = self.experts[m].batch_size
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                reqs, rts = [requests[i] for i in chunk], [routings[i] for i in chunk]
                with torch.inference_mode():
                    driver = self._driver(rts, reqs)
                done = decode.generate_batch(driver, reqs, trace=self._tracer(rts, reqs))
                for i, c in zip(chunk, done):
                    results[i] = c
        return [c for c in results if c is not None]

    # --------------------------------------------------------------- scoring
    def loglikelihood(self, context: str, continuation: str) -> float:
        """log P(continuation | context) under the mixture (routed on the context)."""
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, share_context: bool | None = None) -> list[tuple[float, bool]]:
        """For each (context, continuation): the summed log-probability and whether the
        continuation is the greedy one. The router and the peers read the context
        only; the primary reads context and continuation in its own tokens."""
        import torch

        from collab.latent.model import primary_logits

        contexts = list(dict.fromkeys(c for c, _ in pairs))
        routing_of = dict(zip(contexts, self.route(contexts))) if contexts else {}
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for m in sorted({routing_of[c].primary for c, _ in pairs}):
            expert = self.experts[m]
            idx = [i for i, (c, _) in enumerate(pairs) if routing_of[c].primary == m]
            split = {i: expert._split_context(*pairs[i]) for i in idx}
            idx = [i for i in idx if split[i][1]]  # an empty continuation scores 0
            idx.sort(key=lambda i: -sum(len(x) for x in split[i]))
            step = batch_size or expert.batch_size
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                rts = [routing_of[pairs[i][0]] for i in chunk]
                peer_prompts = [[self.experts[j]._split_context(pairs[i][0], pairs[i][1])[0] for j, _ in rt.peers] for i, rt in zip(chunk, rts)]
                with torch.inference_mode():
                    memory = self._memory(rts, peer_prompts)
                    conts = [split[i][1] for i in chunk]
                    keep = max(len(c) for c in conts) + 1
                    logits = primary_logits(expert, self.interactions, m, [split[i][0] + split[i][1] for i in chunk], memory, grad=False, keep=keep)
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    for b, (i, cont) in enumerate(zip(chunk, conts)):
                        at = keep - len(cont) - 1  # the column that predicts the continuation's first token
                        rows = logp[b, at : at + len(cont)]
                        target = torch.tensor(cont, device=rows.device)
                        total = float(rows.gather(1, target[:, None]).sum())
                        greedy = bool((rows.argmax(dim=-1) == target).all())
                        out[i] = (total, greedy)
        return out


# ----------------------------------------------------------------------- spec
class LatentSystemType:
    """``type: latent`` in a spec: checks the keys, the experts and the checkpoint
    against each other, and builds a MixtureOfThoughts."""

    keys = {"type", "checkpoint", "experts", "top_k"}

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        spec.reject_unknown_keys(config, kp, "latent", self.keys)
        names = config.get("experts")
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise spec.error(f"{kp}.experts", f"expected a list of at least two expert names, found {names!r}")
        if len(set(names)) != len(names):
            raise spec.error(f"{kp}.experts", f"an expert is listed twice: {names!r}")
        for i, n in enumerate(names):
            if n not in spec.experts:
                raise spec.error(f"{kp}.experts[{i}]", f"unknown expert '{n}'; defined: {', '.join(spec.experts) or 'none'}")
            if spec.experts[n].remote:
                raise spec.error(f"{kp}.experts[{i}]", f"expert '{n}' is a remote endpoint; a latent mixture needs local models (hidden states)")
        path = spec.require_dir(config, "checkpoint", kp)
        try:
            lc = read_config(path)
        except LatentArtefactError as e:
            raise spec.error(f"{kp}.checkpoint", str(e)) from e
        if len(lc.experts) != len(names):
            raise spec.error(
                f"{kp}.experts",
                f"the checkpoint '{config['checkpoint']}' was trained with {len(lc.experts)} experts ({', '.join(lc.names)}); {len(names)} given ({', '.join(names)})",
            )
        for i, (n, trained) in enumerate(zip(names, lc.experts)):
            ref, trained_ref = str(spec.experts[n].ref), str(trained.get("ref"))
            if ref.startswith("zoo:") and trained_ref.startswith("zoo:") and ref != trained_ref:
                raise spec.error(f"{kp}.experts[{i}]", f"expert '{n}' is {ref}, but the checkpoint '{config['checkpoint']}' was trained with {trained_ref} in this place")
        if "top_k" in config:
            k = config["top_k"]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(names):
                raise spec.error(f"{kp}.top_k", f"expected an integer from 1 to {len(names)} (the number of experts), found {k!r}")

    def build(self, spec: Any, name: str, config: dict[str, Any]) -> MixtureOfThoughts:
        experts = [spec.expert(n) for n in config["experts"]]
        try:
            return MixtureOfThoughts.load(spec.resolve_path(config["checkpoint"]), experts, name=name, top_k=config.get("top_k"))
        except CollabError as e:
            raise spec.error(f"systems.{name}", str(e)) from e
