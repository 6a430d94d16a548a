"""``collab zoo build``: fine-tune the zoo's domain experts from SmolLM2-135M-Instruct.

Each domain expert is a LoRA adapter (PEFT) trained on one skill of
``collab.skills`` with seeded, generated data; the adapter, its training config
and the hash of its training data are written as safetensors + JSON. Training
checkpoints every ``checkpoint_every`` steps (adapter and optimizer state as
safetensors), so an interrupted build resumes where it stopped and ends with
the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from collab import skills
from collab.io import TOKENIZER_FILES
from collab.zoo import shipped_dir

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DomainExpertConfig:
    """How one domain expert is trained (recorded in its ``collab_train.json``)."""

    skill: str
    base: str = "zoo:smollm2-135m-instruct"
    method: str = "lora"
    rank: int = 8
    alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    learning_rate: float = 2e-3
    steps: int = 150
    batch_size: int = 8
    train_examples: int = 4000
    warmup_steps: int = 10
    seed: int = 0
    data_seed: int = skills.TRAIN_SEED
    checkpoint_every: int = 25
    save_dtype: str = "float16"


#: Steps per skill: list and unit formats are learned faster than carrying digits.
SKILL_STEPS = {"arith": 150, "lists": 60, "units": 60}


def default_configs() -> dict[str, DomainExpertConfig]:
    """The shipped domain experts: ``smol-<skill>`` for every skill."""
    return {f"smol-{s}": DomainExpertConfig(skill=s, steps=SKILL_STEPS.get(s, 150)) for s in skills.SKILLS}


def _training_texts(expert: Any, examples: list[skills.Example]) -> list[tuple[list[int], int]]:
    """Token ids of each chat-formatted example and the index where the answer starts."""
    from collab.system import GenerationRequest

    out = []
    end = expert.tokenizer.eos_token_id
    for ex in examples:
        prompt_ids = expert.encode(GenerationRequest.chat(ex.question))
        answer_ids = expert.tokenizer(ex.answer, add_special_tokens=False).input_ids + [end]
        out.append((prompt_ids + answer_ids, len(prompt_ids)))
    return out


def _batch(items: list[tuple[list[int], int]], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (seq, start) in enumerate(items):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def _data_hash(examples: list[skills.Example]) -> str:
    from collab.io import sha256_text

    return sha256_text("\n".join(f"{e.question}\t{e.answer}" for e in examples))


def _save_checkpoint(ckpt: Path, model: Any, optimizer: Any, step: int, losses: list[float]) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from collab.io import atomic_directory, atomic_write_json

    with atomic_directory(ckpt, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(tmp / "adapter.safetensors"))
        opt_state: dict[str, Any] = {}
        for i, st in optimizer.state_dict()["state"].items():
            for k, v in st.items():
                opt_state[f"{i}.{k}"] = v if hasattr(v, "contiguous") else __import__("torch").tensor(float(v))
        save_file({k: v.contiguous() for k, v in opt_state.items()}, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "state.json", {"step": step, "losses": losses})


def _load_checkpoint(ckpt: Path, model: Any, optimizer: Any) -> tuple[int, list[float]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter.safetensors")))
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    sd = optimizer.state_dict()
    for key, v in flat.items():
        i, k = key.split(".", 1)
        sd["state"].setdefault(int(i), {})[k] = v
    optimizer.load_state_dict(sd)
    return int(state["step"]), list(state["losses"])


@dataclass
class LoraRun:
    """A finished LoRA training run: the PEFT model (adapter attached, in eval
    mode), the expert whose model and tokenizer it wraps, and the loss per step."""

    model: Any
    expert: Any
    losses: list[float]


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples that make up training step ``step``: the data is
    shuffled once per epoch with ``seed`` and cut into batches in order, so the
    batch of a step depends only on the step (this is what makes resumption exact)."""
    from collab.training import batch_order

    if n_examples < batch_size:
        raise ValueError(f"training data: expected at least batch_size={batch_size} examples, found {n_examples}")
    return batch_order(step, n_examples, batch_size, seed)


def train_lora(
    config: DomainExpertConfig,
    examples: list[skills.Example],
    *,
    base: str | Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    checkpoint: Path | None = None,
    stop_after: int | None = None,
) -> LoraRun:
    """Train a fresh LoRA adapter (``config``'s rank, targets, schedule and seed)
    on ``examples`` starting from ``base`` (default ``config.base``): any
    reference ``Expert.load`` takes, e.g. a model directory. ``config.skill``,
    ``train_examples`` and ``data_seed`` are not read: the examples are given.

    With ``checkpoint``, the adapter and optimizer state are saved there every
    ``config.checkpoint_every`` steps and training resumes from it; ``stop_after``
    ends training after that many steps in this call, as an interruption would."""
    import math
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from collab.experts import Expert

    torch.manual_seed(config.seed)
    expert = Expert.load(str(base) if base is not None else config.base)
    data = _training_texts(expert, examples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers' deprecated is_gradient_checkpointing
        model = get_peft_model(
            expert.model,
            LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=config.target_modules, task_type="CAUSAL_LM"),
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.learning_rate * (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.learning_rate * 0.5 * (1 + math.cos(math.pi * frac))

    step, losses = (0, [])
    if checkpoint is not None and (checkpoint / "state.json").exists():
        step, losses = _load_checkpoint(checkpoint, model, optimizer)
    pad = expert.tokenizer.pad_token_id
    done_here = 0
    while step < config.steps:
        items = [data[i] for i in batch_indices(len(data), config.batch_size, config.seed, step)]
        ids, mask, labels = _batch(items, pad)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        done_here += 1
        losses.append(round(float(loss.detach()), 5))
        if progress is not None:
            progress(step, config.steps, losses[-1])
        if checkpoint is not None and step % config.checkpoint_every == 0 and step < config.steps:
            _save_checkpoint(checkpoint, model, optimizer, step, losses)
        if stop_after is not None and done_here >= stop_after and step < config.steps:
            if checkpoint is not None:
                _save_checkpoint(checkpoint, model, optimizer, step, losses)
            raise KeyboardInterrupt(f"stopped after {done_here} steps (step {step} of {config.steps})")
    model.eval()
    return LoraRun(model=model, expert=expert, losses=losses)


def save_merged(run: LoraRun, out_dir: Path, side_files_from: Path | None = None) -> Path:
    """Merge ``run``'s adapter into its base's weights and write the dense model
    (float32 safetensors, config, tokenizer) to ``out_dir`` atomically.

    The tokenizer files are copied from ``side_files_from`` (the base's model
    directory) when given, so they stay byte-identical to the base's; otherwise
    the loaded tokenizer is saved."""
    import shutil

    from collab.io import atomic_directory

    dense = run.model.merge_and_unload()  # W + B @ A * alpha / r, in the weights' dtype (float32)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        dense.save_pretrained(str(tmp), safe_serialization=True)
        if side_files_from is None:
            run.expert.tokenizer.save_pretrained(str(tmp))
        else:
            for name in TOKENIZER_FILES:
                if (side_files_from / name).exists():
                    shutil.copy2(side_files_from / name, tmp / name)
    return out_dir


def build_domain_expert(
    name: str,
    config: DomainExpertConfig,
    out_root: Path,
    progress: Callable[[int, int, float], None] | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train one domain expert into ``out_root/name`` (resuming from its checkpoint).

    ``stop_after`` ends training early after that many steps in this call, as an
    interruption would (used by tests of resumption)."""
    from collab.io import atomic_directory, atomic_write_json

    t0 = time.perf_counter()
    examples = skills.generate(config.skill, config.train_examples, config.data_seed)
    ckpt = out_root / f".{name}.checkpoint"
    run = train_lora(config, examples, progress=progress, checkpoint=ckpt, stop_after=stop_after)
    model, losses = run.model, run.losses
    target = out_root / name
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        finish_adapter(tmp, config)
        atomic_write_json(
            tmp / "collab_train.json",
            {
                "name": name,
                "config": dataclasses.asdict(config),
                "skill_description": skills.SKILL_DESCRIPTIONS[config.skill],
                "train_data_sha256": _data_hash(examples),
                "seconds": round(time.perf_counter() - t0, 1),
                "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                "losses": losses,
            },
        )
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    return target


def finish_adapter(adapter_dir: Path, config: DomainExpertConfig) -> None:
    """Point the adapter at its zoo base and store it in ``save_dtype`` to keep it small."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = config.base
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    weights = adapter_dir / "adapter_model.safetensors"
    dtype = getattr(torch, config.save_dtype)
    save_file({k: v.to(dtype).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))


def build_zoo(only: list[str] | None = None, out_dir: Path | None = None, steps: int | None = None) -> list[Path]:
    """Build the named domain experts (all by default) with rich progress bars."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from collab.errors import CollabError

    configs = default_configs()
    names = only or list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise CollabError(f"--only: unknown domain expert '{unknown[0]}'; expected one of {', '.join(configs)}")
    root = out_dir or shipped_dir()
    root.mkdir(parents=True, exist_ok=True)
    built = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        for name in names:
            cfg = configs[name]
            if steps is not None:
                cfg = dataclasses.replace(cfg, steps=steps)
            task = bar.add_task(f"{name} ({cfg.skill})", total=cfg.steps, loss="-")

            def report(step: int, total: int, loss: float, task: Any = task) -> None:
                bar.update(task, completed=step, loss=f"{loss:.3f}")

            built.append(build_domain_expert(name, cfg, root, progress=report))
    return built
