"""Training a Co-LLM deferral head (``collab decode train``).

Three phases, as the reference (clinicalml/co-llm) runs them:

1. **Scoring**, once: the frozen base and every frozen assistant read the
   training data in inference mode. Stored per answer token: the base's final
   hidden state, each model's log-probability of the gold token and whether
   that token is its top-1. The assistants are never run again (nor changed).
2. **Initialisation** (``init_steps``): every deferral vector starts as the mean
   output embedding and is fit to the weak labels (assistant where its top-1 is
   gold and the base's is not) with a weighted cross-entropy (``pos_weight``) on
   the stored hidden states; only the head trains.
3. **Marginal likelihood** (``steps``): maximise sum_j P(Z_t = j) P_j(x_t) over
   the answer tokens. With ``train_base="none"`` only the head trains, on the
   stored states; with ``"lora"`` a LoRA on the base trains too (the reference
   fine-tunes the base fully; LoRA is the CPU-sized choice), the base re-read
   with gradients at every step.

Checkpoints (head, optimizer, LoRA, the scored features) go to a hidden
directory beside the output every ``checkpoint_every`` steps; a rerun with the
same settings resumes there and ends with the same weights as an uninterrupted
run. The output directory is written atomically (``decoding.artefact``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from collab.artefacts import check_output
from collab.errors import CollabError, Interrupted
from collab.training import TrainingCheckpoint, batch_order, load_expert
from decoding.data import TrainingData
from decoding.features import Features, Progress, answer_states, score_data

if TYPE_CHECKING:
    import torch

    from collab.experts import Expert
    from decoding.head import DeferralHead

FEATURES_FILE = "features.safetensors"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Hyper-parameters of ``collab decode train`` (recorded in the head's config.json)."""

    steps: int = 200
    """Marginal-likelihood steps."""
    init_steps: int = 100
    """Weak-supervision steps (the head alone, on the frozen base's hidden states)."""
    train_base: str = "none"
    """'none': only the head trains; 'lora': the head and a LoRA on the base."""
    batch_size: int = 16
    """Training conversations per step."""
    lr: float = 1e-3
    """The head's learning rate in the marginal-likelihood stage."""
    init_lr: float = 1e-3
    """The head's learning rate in the weak-supervision stage."""
    lora_lr: float = 5e-4
    """The base LoRA's learning rate (train_base='lora')."""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    pos_weight: float = 8.0
    """Weight of the assistant labels in the weak-supervision loss (the reference uses about 8)."""
    examples: int | None = 1000
    """Conversations to read (the first N of a file; N drawn from a skill's training split)."""
    seed: int = 0
    checkpoint_every: int = 50

    def check(self) -> None:
        if self.train_base not in ("none", "lora"):
            raise CollabError(f"--train-base: expected 'none' or 'lora', found {self.train_base!r}")
        for key in ("steps", "init_steps", "checkpoint_every"):
            if int(getattr(self, key)) < (1 if key == "checkpoint_every" else 0):
                raise CollabError(f"--{key.replace('_', '-')}: expected an integer >= {1 if key == 'checkpoint_every' else 0}, found {getattr(self, key)!r}")
        if self.batch_size < 1:
            raise CollabError(f"--batch-size: expected an integer >= 1, found {self.batch_size!r}")
        if self.examples is not None and self.examples < 1:
            raise CollabError(f"--examples: expected an integer >= 1, found {self.examples!r}")
        for key in ("lr", "init_lr", "lora_lr", "pos_weight"):
            if not float(getattr(self, key)) > 0:
                raise CollabError(f"--{key.replace('_', '-')}: expected a positive number, found {getattr(self, key)!r}")


def _tensors(head: "DeferralHead", lora_model: Any) -> dict[str, "torch.Tensor"]:
    """What the checkpoint holds: the head's weight and, if any, the base's LoRA."""
    tensors = {"head.weight": head.weight}
    if lora_model is not None:
        from peft import get_peft_model_state_dict

        tensors.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(lora_model).items()})
    return tensors


def _restore(tensors: dict[str, "torch.Tensor"], head: "DeferralHead", lora_model: Any) -> None:
    head.weight.data.copy_(tensors["head.weight"])
    if lora_model is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(lora_model, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})


def _identity(expert: "Expert") -> dict[str, Any]:
    return {"name": expert.name, "ref": expert.ref or expert.name}


def train_colm(
    base: "str | Expert",
    assistants: Sequence["str | Expert"],
    data: "str | TrainingData",
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train a deferral head for ``base`` and ``assistants`` (references or Experts) on
    ``data`` (a source for ``decoding.data.load_data``, or loaded data) into ``out``.

    The assistants are only ever run in inference mode; with ``train_base="lora"``
    the LoRA trains on a copy of the base's weights. ``stop_after`` stops after
    that many optimisation steps in this call, as an interruption would (tests of
    resumption). An interruption (Ctrl-C) saves the checkpoint and raises
    ``collab.errors.Interrupted``; the same call again resumes."""
    import torch

    from collab.io import atomic_directory, sha256_text
    from decoding.artefact import HeadConfig, save_head
    from decoding.data import load_data
    from decoding.head import (
        DeferralHead,
        marginal_nll,
        weak_labels,
        weighted_init_loss,
    )
    from decoding.system import check_shared_tokenizer

    config = config or TrainConfig()
    config.check()
    out = Path(out)
    check_output(out, overwrite, "a deferral head", "the new head")
    if not assistants:
        raise CollabError("--assistant: expected at least one assistant expert")
    t0 = time.perf_counter()
    base_e = load_expert(base)
    assistant_es = [load_expert(a) for a in assistants]
    check_shared_tokenizer(base_e, assistant_es)
    td = data if isinstance(data, TrainingData) else load_data(data, config.examples)
    items = td.tokenize(base_e)
    hidden_size = int(base_e.model.config.get_text_config().hidden_size)
    k = len(assistant_es)
    settings = {k_: v for k_, v in dataclasses.asdict(config).items() if k_ != "checkpoint_every"}
    identities = [_identity(base_e)] + [_identity(a) for a in assistant_es]
    fingerprint = sha256_text(json.dumps([settings, identities, td.sha256], sort_keys=True))
    ckpt = TrainingCheckpoint(out, fingerprint)
    state = ckpt.state() or {"stage": "init", "step": 0, "losses": {"init": [], "marginal": []}}

    if ckpt.path(FEATURES_FILE).is_file():
        features = Features.load(ckpt.path(FEATURES_FILE))
    else:
        features = score_data(base_e, assistant_es, items, batch_size=min(config.batch_size, 16), progress=progress)
        ckpt.write(FEATURES_FILE, features.save)
    labels = weak_labels(features.hits[:, 0], features.hits[:, 1:], features.log_probs[:, 1:])

    torch.manual_seed(config.seed)
    head = DeferralHead(hidden_size, k)
    head.init_from_output_embeddings(base_e.model.get_output_embeddings().weight.detach())
    lora_model = None
    if config.train_base == "lora":
        lora_model = _lora_copy(base_e, config)
    steps_done = 0

    def run_stage(stage: str, total: int, optimizer: Any, loss_at: Callable[[list[int]], "torch.Tensor"], params: list[Any]) -> None:
        nonlocal steps_done
        losses = state["losses"][stage]
        step = state["step"] if state["stage"] == stage else 0
        try:
            while step < total:
                convs = batch_order(step, len(items), config.batch_size, config.seed, stage)
                loss = loss_at(convs)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_done += 1
                losses.append(round(float(loss.detach()), 5))
                state.update(stage=stage, step=step)
                if progress is not None:
                    progress(stage, step, total, losses[-1])
                if step % config.checkpoint_every == 0 and step < total:
                    ckpt.save(state, _tensors(head, lora_model), optimizer)
                if stop_after is not None and steps_done >= stop_after and step < total:
                    raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            ckpt.save(state, _tensors(head, lora_model), optimizer)
            raise Interrupted(
                f"training stopped after {stage} step {step} of {total}; the checkpoint is in {ckpt.dir}: "
                "rerun the same command to resume"
            ) from e

    # 2. weak supervision: the head alone on the frozen hidden states
    if state["stage"] == "init":
        opt = torch.optim.AdamW([head.weight], lr=config.init_lr, weight_decay=0.0)
        if state["step"] > 0:
            _restore(ckpt.restore(opt), head, None)

        def init_loss(convs: list[int]) -> "torch.Tensor":
            rows = features.rows(convs)
            return weighted_init_loss(head.log_probs(features.hidden[rows]), labels[rows], config.pos_weight)

        run_stage("init", config.init_steps, opt, init_loss, [head.weight])
        state.update(stage="marginal", step=0)

    # 3. marginal likelihood: the head, and the base's LoRA if asked
    groups: list[dict[str, Any]] = [{"params": [head.weight], "lr": config.lr}]
    lora_params: list[Any] = []
    if lora_model is not None:
        lora_params = [p for p in lora_model.parameters() if p.requires_grad]
        groups.append({"params": lora_params, "lr": config.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    if state["stage"] == "marginal" and state["step"] > 0:
        _restore(ckpt.restore(opt), head, lora_model)
    pad = base_e.tokenizer.pad_token_id

    def marginal_loss(convs: list[int]) -> "torch.Tensor":
        rows = features.rows(convs)
        assistant_lp = features.log_probs[rows, 1:]
        if lora_model is None:
            return marginal_nll(head.log_probs(features.hidden[rows]), features.log_probs[rows])
        from decoding.head import gold_log_probs

        h, logits, gold = answer_states(lora_model.get_base_model(), [items[c] for c in convs], pad)
        base_lp = gold_log_probs(logits, gold)
        return marginal_nll(head.log_probs(h), torch.cat([base_lp[:, None], assistant_lp.to(base_lp.device)], dim=1))

    run_stage("marginal", config.steps, opt, marginal_loss, [head.weight, *lora_params])

    metrics = _metrics(head, features, labels, state["losses"], [e["name"] for e in identities])
    hc = HeadConfig(
        base=identities[0],
        assistants=identities[1:],
        hidden_size=hidden_size,
        vocab_size=len(base_e.tokenizer),
        train_base=config.train_base,
        training=dataclasses.asdict(config),
        data={**td.describe(), "answer_tokens": int(features.hidden.shape[0])},
        metrics={**metrics, "seconds": round(time.perf_counter() - t0, 1)},
    )
    head.eval()
    if lora_model is not None:
        lora_model.eval()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_head(tmp, head, hc, lora_model)
    ckpt.remove()
    return out


def _lora_copy(base: "Expert", config: TrainConfig) -> Any:
    """A PEFT LoRA model over a copy of the base's weights (the base Expert stays as it is)."""
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base.model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        lora = get_peft_model(
            model,
            LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=list(config.lora_targets), task_type="CAUSAL_LM"),
        )
    lora.train()
    return lora


def _metrics(head: "DeferralHead", features: Features, labels: "torch.Tensor", losses: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """What the head does on its training tokens (with the frozen base's states)."""
    import torch

    from decoding.head import choose_writers, deferral_probability

    with torch.no_grad():
        log_pz = head.log_probs(features.hidden)
        g = deferral_probability(log_pz)
        writers = choose_writers(log_pz, 0.5)
    nll = -features.log_probs.mean(dim=0)
    return {
        "answer_tokens": int(len(labels)),
        "weak_label_share": {names[j]: round(float((labels == j).float().mean()), 4) for j in range(1, len(names))},
        "top1_accuracy": {n: round(float(features.hits[:, j].float().mean()), 4) for j, n in enumerate(names)},
        "nll_per_token": {n: round(float(nll[j]), 4) for j, n in enumerate(names)},
        "nll_marginal": round(float(-torch.logsumexp(log_pz + features.log_probs, dim=-1).mean()), 4),
        "mean_deferral_probability": round(float(g.mean()), 4),
        "deferral_rate_at_0.5": round(float((writers > 0).float().mean()), 4),
        "final_loss": {s: (round(sum(v[-10:]) / len(v[-10:]), 5) if v else None) for s, v in losses.items()},
        "losses": losses,
    }
