"""Training a Mixture of Thoughts (``collab latent train``).

The experts stay frozen (their weights are never changed; only activations carry
gradients through them). What trains: the router (an MLP over a frozen query
embedding) and every expert's interaction layers. Two phases:

1. **Scoring**, once: every expert alone reads every training conversation in
   inference mode; kept per (conversation, expert): the answer's summed negative
   log-likelihood, which is comparable across tokenisers (it is -log P of the
   same answer text, plus the expert's end of sequence).
2. **Joint training** (``steps``), per batch:
   - the router scores the experts; the top-K are active, the best the primary;
   - the peers read the prompts without gradients; their states at the end of
     each stack are projected into the latent space (with gradients) and scaled
     by their router weight (a softmax over the active scores, so the router
     also learns from the primary's loss);
   - the primary reads prompt and answer with its interaction layers attached;
   - loss = LM loss of the primary on the answer tokens
     + ``router_weight`` * cross-entropy between the router's softmax and
       softmax(-NLL / ``temperature``) over the experts alone (which expert would
       have answered best: the router's own supervision, without which the
       selection has no signal beyond the mixture's loss)
     + ``balance_weight`` * M * sum_m f_m P_m (the Switch-Transformer
       load-balancing term: f_m the share of rows whose primary is m, P_m the
       router's mean probability of m).

Checkpoints (trained tensors, optimizer, the scores) go to a hidden directory
beside the output every ``checkpoint_every`` steps; a rerun with the same
settings resumes there and ends with the same weights as an uninterrupted run.
The output directory is written atomically and holds only trained tensors.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from collab.artefacts import check_output
from collab.errors import CollabError, Interrupted
from collab.latent.data import Conversation, Conversations
from collab.training import TrainingCheckpoint, batch_order, load_expert

if TYPE_CHECKING:
    import torch

    from collab.experts import Expert
    from collab.latent.router import QueryEncoder

#: progress(phase, done, total, loss or None), phase "scoring" or "training"
Progress = Callable[[str, int, int, "float | None"], None]
SCORES_FILE = "scores.safetensors"


@dataclass
class LatentTrainConfig:
    """Hyper-parameters of ``collab latent train`` (recorded in the checkpoint's config.json)."""

    top_k: int = 2
    """Active experts per query (the primary and K-1 peers)."""
    stacks: int = 4
    """Q: interaction layers per expert, at the end of Q equal stacks of its layers."""
    latent_dim: int = 128
    """Width of the shared latent space."""
    heads: int = 4
    """Cross-attention heads (must divide latent_dim)."""
    router_hidden: int = 256
    """Hidden width of the router's MLP."""
    encoder: str = "minilm"
    """The router's frozen query encoder: 'minilm' (zoo:minilm-l6) or 'ngram' (hashed character 3-grams)."""
    steps: int = 100
    """Joint training steps."""
    batch_size: int = 8
    """Conversations per step."""
    lr: float = 1e-3
    """Learning rate of the interaction layers (but their gates)."""
    gate_lr: float = 1e-2
    """Learning rate of the gates: they start at zero and everything behind them gets
    gradients only once they open, so they move faster than the rest in short runs."""
    router_lr: float = 1e-3
    """Learning rate of the router."""
    router_weight: float = 1.0
    """Weight of the router's loss."""
    balance_weight: float = 0.01
    """Weight of the load-balancing loss."""
    temperature: float = 1.0
    """Temperature of the router's target softmax(-NLL / T) over the experts."""
    examples: int | None = 400
    """Conversations to read (the first N of a file; N drawn from a skill's training split)."""
    max_prompt_tokens: int = 96
    """Longest prompt kept (its last tokens), per expert."""
    max_answer_tokens: int = 48
    """Longest answer kept (end of sequence included), per expert."""
    seed: int = 0
    checkpoint_every: int = 25

    def check(self) -> None:
        ints = {"top_k": 1, "stacks": 1, "latent_dim": 1, "heads": 1, "router_hidden": 1, "steps": 0, "batch_size": 1,
                "max_prompt_tokens": 1, "max_answer_tokens": 2, "checkpoint_every": 1}
        for key, low in ints.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise CollabError(f"--{key.replace('_', '-')}: expected an integer >= {low}, found {v!r}")
        if self.latent_dim % self.heads:
            raise CollabError(f"--latent-dim: {self.latent_dim} is not divisible by --heads {self.heads}")
        if self.examples is not None and self.examples < 1:
            raise CollabError(f"--examples: expected an integer >= 1, found {self.examples!r}")
        for key in ("lr", "gate_lr", "router_lr", "temperature"):
            if not float(getattr(self, key)) > 0:
                raise CollabError(f"--{key.replace('_', '-')}: expected a positive number, found {getattr(self, key)!r}")
        for key in ("router_weight", "balance_weight"):
            if float(getattr(self, key)) < 0:
                raise CollabError(f"--{key.replace('_', '-')}: expected a number >= 0, found {getattr(self, key)!r}")


def _tensors(modules: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The trained modules' tensors, under ``MODULE.KEY`` (what the checkpoint holds)."""
    return {f"{name}.{k}": v for name, mod in modules.items() for k, v in mod.state_dict().items()}


def _answer_nll(logits: "torch.Tensor", answers: Sequence[Sequence[int]]) -> "torch.Tensor":
    """Per row, the summed NLL of its answer; ``logits`` (B, keep, V) are the last
    ``keep`` columns of left-padded rows that end with their answers."""
    import torch

    keep = logits.shape[1]
    out = []
    for b, ans in enumerate(answers):
        at = keep - len(ans) - 1
        rows = torch.log_softmax(logits[b, at : at + len(ans)].float(), dim=-1)
        target = torch.tensor(list(ans), device=rows.device)
        out.append(-rows.gather(1, target[:, None]).sum())
    return torch.stack(out)


def score_experts(experts: Sequence["Expert"], items: Sequence[Sequence[tuple[list[int], list[int]]]], batch_size: int, progress: Progress | None = None) -> "torch.Tensor":
    """(N, M): each expert's summed NLL of each answer, alone, in inference mode."""
    import torch

    from collab.latent.model import left_pad

    n = len(items[0])
    out = torch.zeros(n, len(experts))
    total = n * len(experts)
    done = 0
    for m, e in enumerate(experts):
        order = sorted(range(n), key=lambda i: len(items[m][i][0]) + len(items[m][i][1]))
        for start in range(0, n, batch_size):
            chunk = order[start : start + batch_size]
            answers = [items[m][i][1] for i in chunk]
            ids, mask, pos = left_pad([items[m][i][0] + items[m][i][1] for i in chunk], e.tokenizer.pad_token_id)
            keep = max(len(a) for a in answers) + 1
            logits = e.forward(ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=keep).logits[:, -keep:]
            out[chunk, m] = _answer_nll(logits, answers).cpu()
            done += len(chunk)
            if progress is not None:
                progress("scoring", done, total, None)
    return out


def train_latent(
    experts: Sequence["str | Expert"],
    data: "str | Sequence[Conversation] | Conversations",
    out: str | Path,
    config: LatentTrainConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
    encoder: "QueryEncoder | None" = None,
) -> Path:
    """Train a mixture of ``experts`` (references or Experts, at least two) on
    ``data`` (a JSONL path, ``skill:NAME``, or conversations) into ``out``.

    The experts' weights are never changed. ``stop_after`` stops after that many
    steps in this call, as an interruption would (tests of resumption). An
    interruption (Ctrl-C) saves the checkpoint and raises
    ``collab.errors.Interrupted``; the same call again resumes. ``encoder``
    replaces the one ``config.encoder`` names (same config recorded)."""
    import torch

    from collab.io import atomic_directory, sha256_text
    from collab.latent.artefact import LatentConfig, save_mixture
    from collab.latent.data import load_conversations
    from collab.latent.model import Interactions, expert_shape
    from collab.latent.router import LatentRouter, make_encoder

    config = config or LatentTrainConfig()
    config.check()
    out = Path(out)
    check_output(out, overwrite, "a trained mixture", "the new mixture")
    if len(experts) < 2:
        raise CollabError(f"--experts: expected at least two experts, found {len(experts)}")
    if config.top_k > len(experts):
        raise CollabError(f"--top-k: expected at most {len(experts)} (the number of experts), found {config.top_k}")
    t0 = time.perf_counter()
    es = [load_expert(e) for e in experts]
    names = [e.name for e in es]
    if len(set(names)) != len(names):
        raise CollabError(f"--experts: two experts share a name ({', '.join(names)}); give each its own")
    shapes = [expert_shape(e) for e in es]
    for e, (_, n_layers) in zip(es, shapes):
        if config.stacks > n_layers:
            raise CollabError(f"--stacks: expert '{e.name}' has {n_layers} layers; expected --stacks <= {n_layers}")
    convs = data if isinstance(data, Conversations) else load_conversations(data, config.examples)
    enc = encoder or make_encoder(config.encoder)
    items = [convs.tokenize(e, config.max_prompt_tokens, config.max_answer_tokens) for e in es]
    identities = [{"name": e.name, "ref": e.ref or e.name} for e in es]
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every"}
    fingerprint = sha256_text(json.dumps([settings, identities, enc.config(), convs.sha256], sort_keys=True))
    ckpt = TrainingCheckpoint(out, fingerprint)
    state = ckpt.state() or {"step": 0, "losses": []}

    frozen = [(p, p.requires_grad) for e in es for p in e.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        if ckpt.path(SCORES_FILE).is_file():
            from safetensors.torch import load_file

            nll = load_file(str(ckpt.path(SCORES_FILE)))["nll"]
        else:
            nll = score_experts(es, items, batch_size=min(config.batch_size, 16), progress=progress)
            from safetensors.torch import save_file

            ckpt.write(SCORES_FILE, lambda path: save_file({"nll": nll.contiguous()}, str(path)))
        z = enc.encode(convs.queries())  # (N, dim), frozen

        torch.manual_seed(config.seed)
        router = LatentRouter(z.shape[1], len(es), hidden=config.router_hidden)
        interactions = Interactions(shapes, config.stacks, config.latent_dim, config.heads)
        device = es[0].device
        router.to(device).train()
        interactions.to(device).train()
        groups = [{"params": list(router.parameters()), "lr": config.router_lr}]
        if config.top_k > 1:
            gates = [p for n, p in interactions.named_parameters() if n.endswith(".gate")]
            groups.append({"params": [p for n, p in interactions.named_parameters() if not n.endswith(".gate")], "lr": config.lr})
            groups.append({"params": gates, "lr": config.gate_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        modules = {"router": router, "interactions": interactions}
        if state["step"] > 0:
            tensors = ckpt.restore(opt)
            for name, mod in modules.items():
                mod.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        trainable = [p for g in groups for p in g["params"]]
        n_conv = len(convs.items)
        step = start = state["step"]
        try:
            while step < config.steps:
                torch.manual_seed(hash((config.seed, step)) % (2**31))  # dropout: the same per step, resumed or not
                idx = batch_order(step, n_conv, config.batch_size, config.seed, "mot")
                parts = _step_loss(config, es, items, interactions, router, z[idx].to(device), nll[idx].to(device), idx)
                loss = parts["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                state["losses"].append({k: round(float(v.detach()) if torch.is_tensor(v) else float(v), 5) for k, v in parts.items()})
                state["step"] = step
                if progress is not None:
                    progress("training", step, config.steps, state["losses"][-1]["loss"])
                if step % config.checkpoint_every == 0 and step < config.steps:
                    ckpt.save(state, _tensors(modules), opt)
                if stop_after is not None and step - start >= stop_after and step < config.steps:
                    raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            ckpt.save(state, _tensors(modules), opt)
            raise Interrupted(
                f"training stopped after step {step} of {config.steps}; the checkpoint is in {ckpt.dir}: rerun the same command to resume"
            ) from e
        router.eval()
        interactions.eval()
        metrics = _metrics(router, interactions, z.to(device), nll, config, es, state["losses"])
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    lc = LatentConfig(
        experts=[{**ident, "hidden_size": d, "layers": n, "cuts": cuts} for ident, (d, n), cuts in zip(identities, shapes, interactions.cuts)],
        stacks=config.stacks,
        top_k=config.top_k,
        latent_dim=config.latent_dim,
        heads=config.heads,
        encoder=enc.config(),
        router_hidden=config.router_hidden,
        training=dataclasses.asdict(config),
        data=convs.describe(),
        metrics={**metrics, "seconds": round(time.perf_counter() - t0, 1)},
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_mixture(tmp, router, interactions, lc)
    ckpt.remove()
    return out


def _step_loss(config: LatentTrainConfig, es: Sequence["Expert"], items: Any, interactions: Any, router: Any, z: "torch.Tensor", nll: "torch.Tensor", idx: list[int]) -> dict[str, Any]:
    """The joint loss of one batch and its parts."""
    import torch

    from collab.latent.model import build_memory, primary_logits
    from collab.latent.system import route_scores

    scores = router(z)  # (B, M)
    logp = torch.log_softmax(scores, dim=-1)
    target = torch.softmax(-nll / config.temperature, dim=-1)  # (B, M): who answers best alone
    router_loss = -(target * logp).sum(dim=-1).mean()
    routings = route_scores(scores, config.top_k)
    m_count = scores.shape[1]
    primaries = torch.tensor([r.primary for r in routings], device=scores.device)
    share = torch.bincount(primaries, minlength=m_count).float() / len(routings)  # f_m
    balance = m_count * (share * logp.exp().mean(dim=0)).sum()
    lm = torch.zeros((), device=scores.device)
    if config.top_k > 1:
        for m in sorted({r.primary for r in routings}):
            rows = [b for b, r in enumerate(routings) if r.primary == m]
            peer_rows = []
            for b in rows:
                active = routings[b].active
                w = torch.softmax(scores[b, active], dim=-1)  # differentiable: the router learns from the LM loss
                peer_rows.append([(j, w[s + 1], items[j][idx[b]][0]) for s, j in enumerate(active[1:])])
            memory = build_memory(interactions, es, peer_rows)
            answers = [items[m][idx[b]][1] for b in rows]
            keep = max(len(a) for a in answers) + 1
            logits = primary_logits(es[m], interactions, m, [items[m][idx[b]][0] + items[m][idx[b]][1] for b in rows], memory, grad=True, keep=keep)
            per_row = _answer_nll(logits, answers) / torch.tensor([len(a) for a in answers], device=logits.device)
            lm = lm + per_row.sum() / len(routings)
    loss = lm + config.router_weight * router_loss + config.balance_weight * balance
    return {"loss": loss, "lm": lm, "router": router_loss, "balance": balance}


def _metrics(router: Any, interactions: Any, z: "torch.Tensor", nll: "torch.Tensor", config: LatentTrainConfig, es: Sequence["Expert"], losses: list[dict[str, float]]) -> dict[str, Any]:
    """What the trained router does on its training queries, and the parameter counts."""
    import torch

    names = [e.name for e in es]
    with torch.no_grad():
        primary = router(z).argmax(dim=-1).cpu()
    oracle = nll.argmin(dim=-1)
    trainable = sum(p.numel() for p in router.parameters()) + (sum(p.numel() for p in interactions.parameters()) if config.top_k > 1 else 0)
    experts_total = sum(p.numel() for e in es for p in e.model.parameters())
    tail = losses[-10:]
    return {
        "primary_share": {n: round(float((primary == m).float().mean()), 4) for m, n in enumerate(names)},
        "oracle_share": {n: round(float((oracle == m).float().mean()), 4) for m, n in enumerate(names)},
        "router_oracle_agreement": round(float((primary == oracle).float().mean()), 4),
        "nll_per_answer": {n: round(float(nll[:, m].mean()), 4) for m, n in enumerate(names)},
        "gates": dict(zip(names, interactions.gates())),
        "trainable_parameters": int(trainable),
        "expert_parameters": int(experts_total),
        "trainable_share": round(trainable / experts_total, 6),
        "final_loss": {k: round(sum(x[k] for x in tail) / len(tail), 5) for k in tail[0]} if tail else None,
        "losses": losses,
    }
