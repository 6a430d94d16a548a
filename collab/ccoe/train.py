"""Training one CCoE expert (``collab ccoe train``).

The expert is a copy of the base's top ``layers`` decoder layers, trained fully on
one domain's conversations while everything else stays the base's and frozen: the
embeddings, the layers below the expert's depth (the backbone), the final norm and
the LM head. The backbone runs without autograd (nothing below the expert needs a
gradient), so a step costs a forward pass of the backbone and a forward and
backward pass of the expert's layers and the head. The loss is the mean negative
log-likelihood of the answer tokens (the prompt is context only).

Each expert trains on its own: training one never touches the base or any other
expert, and experts of one base may take different depths. Checkpoints (the
expert's tensors and the optimizer's state) go to a hidden directory beside the
output every ``checkpoint_every`` steps; a rerun with the same settings resumes
there and ends with the same weights as an uninterrupted run. The output
directory is written atomically and holds only the expert's layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab.errors import CollabError, Interrupted
from collab.training import TrainingCheckpoint, batch_order, load_expert

if TYPE_CHECKING:
    import torch

    from collab.conversations import Conversation
    from collab.experts import Expert

#: progress(phase, done, total, loss or None); the phase is "training"
Progress = Callable[[str, int, int, "float | None"], None]


@dataclass
class CCoETrainConfig:
    """Hyper-parameters of ``collab ccoe train`` (recorded in the expert's config.json)."""

    layers: int = 8
    """L: the expert's own decoder layers, the base's top L (its depth is N - L)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Conversations per step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW), after a linear warm-up, then a cosine decay to zero."""
    warmup_steps: int = 5
    """Steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    examples: int | None = 1000
    """Conversations to read (the first N of a file; N drawn from a skill's training split)."""
    max_tokens: int = 96
    """Longest training sequence: the answer (end of sequence included; at most
    max_tokens - 1 of it) and the prompt's last tokens that fit before it."""
    seed: int = 0
    checkpoint_every: int = 25

    def check(self) -> None:
        ints = {
            "layers": 1,
            "steps": 0,
            "batch_size": 1,
            "warmup_steps": 0,
            "max_tokens": 2,
            "checkpoint_every": 1,
        }
        for key, low in ints.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise CollabError(
                    f"--{key.replace('_', '-')}: expected an integer >= {low}, found {v!r}"
                )
        if self.examples is not None and (
            isinstance(self.examples, bool)
            or not isinstance(self.examples, int)
            or self.examples < 1
        ):
            raise CollabError(
                f"--examples: expected an integer >= 1, found {self.examples!r}"
            )
        if not float(self.lr) > 0:
            raise CollabError(f"--lr: expected a positive number, found {self.lr!r}")
        if float(self.weight_decay) < 0:
            raise CollabError(
                f"--weight-decay: expected a number >= 0, found {self.weight_decay!r}"
            )


def lr_at(config: CCoETrainConfig, step: int) -> float:
    """The learning rate of ``step`` (0-based): linear warm-up, then cosine to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def training_rows(
    expert: Expert, conversations: Any, max_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """Per conversation, in the base's tokens: (the prompt's last tokens that fit, the
    answer with its end of sequence), at most ``max_tokens`` together."""
    out = []
    for prompt, answer in conversations.tokenize(expert, max_tokens, max_tokens - 1):
        room = max_tokens - len(answer)
        out.append((prompt[-room:] if room > 0 else prompt[-1:], answer))
    return out


def step_loss(
    model: Any, branch: str, rows: Sequence[tuple[list[int], list[int]]], pad: int
) -> torch.Tensor:
    """Mean NLL of the answer tokens of ``rows`` through the backbone and ``branch``;
    only the branch's layers (and what they feed) carry autograd."""
    import torch

    from collab.latent.model import left_pad

    ids, mask, pos = left_pad([p + a for p, a in rows], pad)
    keep = max(len(a) for _, a in rows) + 1
    logits = model.forward(
        ids,
        [branch] * len(rows),
        attention_mask=mask,
        position_ids=pos,
        logits_to_keep=keep,
        grad=True,
    ).logits  # (B, keep, V)
    targets = torch.full((len(rows), keep - 1), -100, dtype=torch.long)
    for b, (_, a) in enumerate(rows):
        targets[b, keep - 1 - len(a) :] = torch.tensor(
            a
        )  # rows end in the last column: the answer is the last len(a) tokens
    pred = logits[:, :-1].float()  # column t predicts token t + 1
    return torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]),
        targets.to(pred.device).reshape(-1),
        ignore_index=-100,
    )


def train_expert(
    base: str | Expert,
    data: str | Sequence[Conversation],
    out: str | Path,
    config: CCoETrainConfig | None = None,
    *,
    name: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train a CCoE expert of ``base`` (a reference or an Expert) on ``data`` (a JSONL
    path, ``skill:NAME``, or conversations) into ``out``; returns ``out``.

    ``name`` is the expert's name (default: the skill's, or the data file's stem).
    The base's weights are never changed. ``stop_after`` stops after that many steps
    in this call, as an interruption would (tests of resumption). An interruption
    (Ctrl-C) saves the checkpoint and raises ``collab.errors.Interrupted``; the same
    call again resumes."""
    import torch

    from collab.artefacts import check_output
    from collab.ccoe.artefact import CCoEConfig, save_expert
    from collab.ccoe.model import (
        Branch,
        CCoEModel,
        backbone_fingerprint,
        copy_top_layers,
        num_layers,
        tensor_digests,
    )
    from collab.io import atomic_directory, sha256_text
    from collab.latent.data import Conversations, load_conversations

    config = config or CCoETrainConfig()
    config.check()
    out = Path(out)
    check_output(out, overwrite, "a CCoE expert or model directory", "the new one")
    t0 = time.perf_counter()
    convs = (
        data
        if isinstance(data, Conversations)
        else load_conversations(data, config.examples)
    )  # data errors before the base loads
    expert = load_expert(base)
    n = num_layers(expert.model)
    if config.layers > n:
        raise CollabError(
            f"--layers: the base has {n} decoder layers; expected 1 <= --layers <= {n}, found {config.layers}"
        )
    depth = n - config.layers
    if name is None:
        name = (
            convs.source[6:]
            if convs.source.startswith("skill:")
            else Path(convs.source).stem
        )
    rows = training_rows(expert, convs, config.max_tokens)
    base_ref = expert.ref or expert.name
    base_sha = sha256_text(json.dumps(sorted(tensor_digests(expert.model).items())))
    settings = {
        k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every"
    }
    ckpt = TrainingCheckpoint(
        out,
        sha256_text(
            json.dumps([settings, name, base_sha, convs.sha256], sort_keys=True)
        ),
    )
    state = ckpt.state() or {"step": 0, "losses": []}
    before = float(state.get("seconds", 0.0))  # spent by the runs this one resumes

    def spent() -> float:
        return round(before + time.perf_counter() - t0, 1)

    frozen = [(p, p.requires_grad) for p in expert.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        torch.manual_seed(config.seed)
        branch = Branch(name, depth, copy_top_layers(expert.model, depth))
        model = CCoEModel(expert.model, [branch])
        branch.layers.train().requires_grad_(True)
        params = list(branch.layers.parameters())
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        prefix = model.prefix
        if state["step"] > 0:
            tensors = ckpt.restore(opt)
            with torch.no_grad():
                for key, value in branch.tensors(prefix).items():
                    value.copy_(tensors[key])
        pad = expert.tokenizer.pad_token_id
        step = start = state["step"]
        try:
            while step < config.steps:
                for g in opt.param_groups:
                    g["lr"] = lr_at(config, step)
                idx = batch_order(
                    step, len(rows), config.batch_size, config.seed, "ccoe"
                )
                with expert._lock:
                    loss = step_loss(model, name, [rows[i] for i in idx], pad)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                state["losses"].append(round(float(loss.detach()), 5))
                state["step"] = step
                if progress is not None:
                    progress("training", step, config.steps, state["losses"][-1])
                if step % config.checkpoint_every == 0 and step < config.steps:
                    ckpt.save(
                        {**state, "seconds": spent()}, branch.tensors(prefix), opt
                    )
                if (
                    stop_after is not None
                    and step - start >= stop_after
                    and step < config.steps
                ):
                    raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            ckpt.save({**state, "seconds": spent()}, branch.tensors(prefix), opt)
            raise Interrupted(
                f"training stopped after step {step} of {config.steps}; the checkpoint is in {ckpt.dir}: rerun the same command to resume"
            ) from e
        branch.layers.eval().requires_grad_(False)
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in expert.model.parameters())
        losses = state["losses"]
        metrics = {
            "trainable_parameters": int(trainable),
            "base_parameters": int(total),
            "trainable_share": round(trainable / total, 6),
            "first_loss": losses[0] if losses else None,
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 5)
            if losses
            else None,
            "losses": losses,
            "seconds": spent(),
        }
        cc = CCoEConfig(
            name=name,
            base=base_ref,
            depth=depth,
            layers=config.layers,
            num_hidden_layers=n,
            backbone_sha256=backbone_fingerprint(expert.model, depth),
            hidden_size=int(model.config.hidden_size),
            model_type=str(model.config.model_type),
            layers_prefix=prefix,
            training=dataclasses.asdict(config),
            data=convs.describe(),
            metrics=metrics,
        )
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save_expert(tmp, branch.tensors(prefix), cc)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    ckpt.remove()
    return out
