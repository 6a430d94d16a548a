"""CCoESystem: a frozen base and its experts' own top layers, behind a gate.

CCoE (Li et al. 2024, https://arxiv.org/abs/2407.11686) as a System. For each
query a gate (any collab router, or a fixed choice) picks one expert (a branch)
or none (the base alone). A batch is decoded together whatever its rows' choices:
at every step the backbone's layers run once for all rows, then each branch's
layers on its rows, each row keeping one KV cache across all of them
(``collab.ccoe.model``). A branch that starts deeper than another runs the base's
frozen layers until its depth. The result equals each expert run alone as a
standalone model (``collab ccoe pop``), with one copy of the backbone in memory.

In a spec::

    experts:
      smol: {ref: zoo:smollm2-135m-instruct}
    systems:
      ccoe:
        type: ccoe
        base: smol                          # the shared, frozen base (a local expert of the spec)
        branches:                           # name -> a CCoE expert directory (collab ccoe train|push)
          arith: artefacts/ccoe-arith
          lists: artefacts/ccoe-lists
        gate: artefacts/ccoe-gate           # a router directory over the branch names (and optionally 'smol')
        # gate: {branch: arith}             # or every query to one branch ('smol': the base)

The trace names the chosen branch (``branch``; the base's name when none), its
depth, the gate and its scores.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from collab.ccoe.artefact import CCoEArtefactError, read_config
from collab.ccoe.gate import FixedGate, GateDecision, RouterGate, router_experts
from collab.errors import CollabError
from collab.system import BaseSystem, Completion, GenerationRequest, StreamChunk

if TYPE_CHECKING:
    import torch

    from collab.ccoe.gate import Gate
    from collab.ccoe.model import CCoEModel
    from collab.experts import Expert

reference_url = "https://arxiv.org/abs/2407.11686"


class BranchedRows:
    """The base expert as collab's decoding loop sees it for one batch: every forward
    pass runs the shared backbone for all rows and row b's layers as ``branches[b]``
    chooses (None: the base's own); prompts, stops and tokens are the base's."""

    def __init__(
        self, base: Expert, model: CCoEModel, branches: Sequence[str | None]
    ) -> None:
        self.base = base
        self.ccoe = model
        self.branches = list(branches)
        self.name = base.name
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.eos_token_ids = base.eos_token_ids
        self.prompt_format = base.prompt_format

    @property
    def device(self) -> torch.device:
        return self.base.device

    def encode(self, request: GenerationRequest) -> list[int]:
        return self.base.encode(request)

    def stops_for(self, request: GenerationRequest) -> list[str]:
        return self.base.stops_for(request)

    def max_new_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        return self.base.max_new_tokens(request, prompt_len)

    def trace_for(self, request: GenerationRequest) -> dict[str, Any]:
        return self.base.trace_for(request)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        output_hidden_states: bool = False,
        use_cache: bool = True,
        *,
        position_ids: torch.Tensor | None = None,
        grad: bool = False,
        logits_to_keep: int = 0,
    ) -> Any:
        with self.base._lock:
            return self.ccoe.forward(
                input_ids,
                self.branches,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache if use_cache else None,
                logits_to_keep=logits_to_keep,
                output_hidden_states=output_hidden_states,
                grad=grad,
            )


class CCoESystem(BaseSystem):
    """A base expert, its CCoE experts (``branches``, name -> Branch) and a ``gate``;
    a System and a Scorer. Generation and scoring batch rows of different branches
    together; nothing of the base is copied or changed."""

    type_key = "ccoe"

    def __init__(
        self,
        base: Expert,
        model: CCoEModel,
        gate: Gate,
        *,
        name: str = "ccoe",
        configs: Mapping[str, Any] | None = None,
    ) -> None:
        if model.model is not base.model:
            raise CollabError(
                "CCoESystem: the CCoE model must be built over the base expert's own model"
            )
        self.name = name
        self.base = base
        self.ccoe = model
        self.gate = gate
        self.configs = dict(configs or {})

    @classmethod
    def load(
        cls,
        base: Expert,
        branches: Mapping[str, str | Path],
        gate: Gate | str | Path | None = None,
        *,
        name: str = "ccoe",
    ) -> CCoESystem:
        """The system over ``base`` with the expert directories ``branches`` (name ->
        directory). ``gate``: a Gate, a router directory (a RouterGate over the branch
        names and the base's name), or None for the only branch of a one-branch system."""
        from collab.ccoe.artefact import open_branch
        from collab.ccoe.model import CCoEModel

        if not branches:
            raise CollabError("branches: expected at least one CCoE expert directory")
        model = CCoEModel(base.model)
        configs = {}
        for bname, path in branches.items():
            if bname == base.name:
                raise CollabError(
                    f"branches: '{bname}' is the base's name; give the branch another"
                )
            branch, config = open_branch(
                base.model,
                path,
                name=bname,
                base_name=f"the base '{base.name}' ({base.ref})",
            )
            model.add(branch)
            configs[bname] = config
        if gate is None:
            if len(branches) != 1:
                raise CollabError(
                    f"gate: expected a gate for {len(branches)} branches (a router directory or a Gate)"
                )
            gate = FixedGate(next(iter(branches)))
        elif isinstance(gate, (str, Path)):
            gate = RouterGate(gate, list(branches), base.name, device=str(base.device))
        return cls(base, model, gate, name=name, configs=configs)

    # ---------------------------------------------------------------- routing
    def route(self, requests: Sequence[GenerationRequest]) -> list[GateDecision]:
        """The gate's decision for each request; CollabError for an unknown branch."""
        decisions = self.gate.choose(list(requests))
        for d in decisions:
            if d.branch is not None and d.branch not in self.ccoe.branches:
                raise CollabError(
                    f"the gate chose '{d.branch}', which is not a branch of '{self.name}' ({', '.join(self.ccoe.branches)})"
                )
        return decisions

    def trace_of(
        self, decision: GateDecision, request: GenerationRequest | None = None
    ) -> dict[str, Any]:
        """What the system did for one query: the branch (the base's name for none), its depth, the gate."""
        b = decision.branch
        tr: dict[str, Any] = {
            "system": self.name,
            "type": self.type_key,
            "branch": b if b is not None else self.base.name,
            "depth": self.ccoe.branches[b].depth
            if b is not None
            else self.ccoe.n_layers,
            "gate": {
                **self.gate.describe(),
                "scores": dict(decision.scores),
                "reason": decision.reason,
            },
        }
        if request is not None:
            tr["prompt_format"] = (
                "raw" if request.prompt is not None else self.base.prompt_format
            )
        return tr

    def _tracer(
        self, decisions: Sequence[GateDecision], requests: Sequence[GenerationRequest]
    ) -> Any:
        by_id = {id(r): d for r, d in zip(requests, decisions)}
        return lambda request: self.trace_of(by_id[id(request)], request)

    # ----------------------------------------------------------------- System
    def render(self, request: GenerationRequest) -> str:
        """The exact text the base (and every branch) reads for ``request``."""
        return self.base.render(request)

    def generate(self, request: GenerationRequest) -> Completion:
        return self.generate_batch([request])[0]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        from collab import decode

        decisions = self.route([request])
        driver = BranchedRows(self.base, self.ccoe, [decisions[0].branch])
        yield from decode.stream(
            driver, request, trace=self._tracer(decisions, [request])
        )

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Requests in batches of the base's ``batch_size`` (prompts of similar length
        together), whatever their branches; results in the order of ``requests``."""
        from collab import decode

        if not requests:
            return []
        decisions = self.route(requests)
        encoded = [self.base.encode(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(requests)
        step = self.base.batch_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            reqs, decs = [requests[i] for i in chunk], [decisions[i] for i in chunk]
            driver = BranchedRows(self.base, self.ccoe, [d.branch for d in decs])
            done = decode.generate_batch(
                driver,
                reqs,
                prompts=[encoded[i] for i in chunk],
                trace=self._tracer(decs, reqs),
            )
            for i, c in zip(chunk, done):
                results[i] = c
        return [c for c in results if c is not None]

    # ---------------------------------------------------------------- scoring
    def loglikelihood(self, context: str, continuation: str) -> float:
        """log P(continuation | context), the branch chosen by the gate on the context."""
        return self.loglikelihood_batch([(context, continuation)])[0][0]

    def loglikelihood_batch(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int | None = None,
        share_context: bool | None = None,
    ) -> list[tuple[float, bool]]:
        """For each (context, continuation): the summed log-probability and whether the
        continuation is the greedy one. The gate reads the context (as a raw prompt);
        rows of different branches share one pass of the backbone."""
        import torch

        from collab.latent.model import left_pad

        contexts = list(dict.fromkeys(c for c, _ in pairs))
        chosen = (
            dict(
                zip(
                    contexts,
                    (
                        d.branch
                        for d in self.route(
                            [GenerationRequest(prompt=c) for c in contexts]
                        )
                    ),
                )
            )
            if contexts
            else {}
        )
        split = [self.base._split_context(c, x) for c, x in pairs]
        idx = sorted(
            (i for i, (_, cont) in enumerate(split) if cont),
            key=lambda i: -sum(len(x) for x in split[i]),
        )  # an empty continuation scores 0
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        step = batch_size or self.base.batch_size
        for start in range(0, len(idx), step):
            chunk = idx[start : start + step]
            conts = [split[i][1] for i in chunk]
            keep = max(len(c) for c in conts) + 1
            ids, mask, pos = left_pad(
                [split[i][0] + split[i][1] for i in chunk],
                self.base.tokenizer.pad_token_id,
            )
            with self.base._lock:
                logits = self.ccoe.forward(
                    ids,
                    [chosen[pairs[i][0]] for i in chunk],
                    attention_mask=mask,
                    position_ids=pos,
                    logits_to_keep=keep,
                ).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, keep, V)
            for b, (i, cont) in enumerate(zip(chunk, conts)):
                at = (
                    keep - len(cont) - 1
                )  # the column that predicts the continuation's first token
                rows = logp[b, at : at + len(cont)]
                target = torch.tensor(cont, device=rows.device)
                out[i] = (
                    float(rows.gather(1, target[:, None]).sum()),
                    bool((rows.argmax(dim=-1) == target).all()),
                )
        return out

    # ----------------------------------------------------------------- memory
    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of parameters held: the base (once) and each branch's own layers."""
        from collab.ccoe.model import parameter_bytes

        out = {"base": parameter_bytes([self.base.model])}
        out.update(
            {n: parameter_bytes([b.layers]) for n, b in self.ccoe.branches.items()}
        )
        out["total"] = sum(out.values())
        return out


# ----------------------------------------------------------------------- spec
class CCoESystemType:
    """``type: ccoe`` in a spec: checks the base, the branches (their config.json,
    without loading weights) and the gate, and builds a CCoESystem."""

    keys: ClassVar[frozenset[str]] = frozenset({"type", "base", "branches", "gate"})

    def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
        kp = f"systems.{name}"
        spec.reject_unknown_keys(config, kp, "ccoe", self.keys)
        base = config.get("base")
        if not isinstance(base, str):
            raise spec.error(
                f"{kp}.base",
                f"expected the name of a local expert of the spec (the shared backbone), found {base!r}",
            )
        if base not in spec.experts:
            raise spec.error(
                f"{kp}.base",
                f"unknown expert '{base}'; defined: {', '.join(spec.experts) or 'none'}",
            )
        if spec.experts[base].remote:
            raise spec.error(
                f"{kp}.base",
                f"expert '{base}' is a remote endpoint; CCoE needs a local model (its layers)",
            )
        branches = config.get("branches")
        if not isinstance(branches, dict) or not branches:
            raise spec.error(
                f"{kp}.branches",
                f"expected a mapping of branch name -> CCoE expert directory, found {branches!r}",
            )
        depths = set()
        for bname, path in branches.items():
            bkp = f"{kp}.branches.{bname}"
            if not isinstance(bname, str) or not bname:
                raise spec.error(
                    f"{kp}.branches",
                    f"expected branch names (strings), found {bname!r}",
                )
            if bname == base:
                raise spec.error(
                    bkp,
                    f"'{bname}' is the base's name; give the branch another (the gate's '{base}' means no branch)",
                )
            if not isinstance(path, str):
                raise spec.error(
                    bkp,
                    f"expected a CCoE expert directory (collab ccoe train|push), found {path!r}",
                )
            if not spec.resolve_path(path).is_dir():
                raise spec.error(bkp, f"directory '{path}' not found")
            try:
                cc = read_config(spec.resolve_path(path))
            except CCoEArtefactError as e:
                raise spec.error(bkp, str(e)) from e
            ref, trained = str(spec.experts[base].ref), cc.base
            if ref.startswith("zoo:") and trained.startswith("zoo:") and ref != trained:
                raise spec.error(
                    bkp,
                    f"the expert '{path}' was trained on {trained}, but the base '{base}' is {ref}",
                )
            depths.add(cc.num_hidden_layers)
        if len(depths) > 1:
            raise spec.error(
                f"{kp}.branches",
                f"the experts were trained on bases of different depths ({', '.join(map(str, sorted(depths)))} layers)",
            )
        self._validate_gate(spec, kp, config, list(branches), base)

    def _validate_gate(
        self, spec: Any, kp: str, config: dict[str, Any], branches: list[str], base: str
    ) -> None:
        if "gate" not in config:
            if len(branches) == 1:
                return
            raise spec.error(
                f"{kp}.gate",
                f"missing; expected a router directory over the branches ({', '.join(branches)}) or {{branch: NAME}}",
            )
        gate = config["gate"]
        targets = [*branches, base]
        if isinstance(gate, dict):
            if set(gate) != {"branch"} or gate["branch"] not in targets:
                raise spec.error(
                    f"{kp}.gate",
                    f"expected a router directory or {{branch: NAME}} with NAME one of {', '.join(targets)}, found {gate!r}",
                )
            return
        if not isinstance(gate, str):
            raise spec.error(
                f"{kp}.gate",
                f"expected a router directory (collab route train) or {{branch: NAME}}, found {gate!r}",
            )
        try:
            names = router_experts(spec.resolve_path(gate))
        except CollabError as e:
            raise spec.error(f"{kp}.gate", str(e)) from e
        for n in names:
            if n not in targets:
                raise spec.error(
                    f"{kp}.gate",
                    f"the router '{gate}' was trained on expert '{n}', which is neither a branch ({', '.join(branches)}) nor the base ('{base}')",
                )

    def build(self, spec: Any, name: str, config: dict[str, Any]) -> CCoESystem:
        base = spec.expert(config["base"])
        dirs = {b: spec.resolve_path(p) for b, p in config["branches"].items()}
        gate: Any = config.get("gate")
        if isinstance(gate, dict):
            target = gate["branch"]
            gate = FixedGate(None if target == config["base"] else target)
        elif isinstance(gate, str):
            gate = spec.resolve_path(gate)
        try:
            return CCoESystem.load(base, dirs, gate, name=name)
        except CollabError as e:
            raise spec.error(f"systems.{name}", str(e)) from e
