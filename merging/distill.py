"""FusionFactory's model level: distil what a pool of experts answered into one model.

``distill(table, config, out)`` reads a routing table that holds the pool's responses
and gold answers (``routers.fusion``), builds the fine-tuning set with
``routers.fusion.distill_examples`` (per query the gold answer once, then up to ``k``
correct responses by score then length; ``setting='gold'`` is the gold-only baseline of
the same size) and trains a LoRA adapter on the target with the zoo's trainer
(``collab.zoo_build.train_lora``: the same chat formatting, loss on the answer only,
warm-up then cosine). ``collab fuse distill`` calls it.

The output directory is a LoRA adapter that ``Expert.load`` takes (its base is the
target reference), with ``distill.json`` (settings, the table's hash, counts per source,
losses, seconds) and ``distill_data.jsonl`` (the examples, in order). An interrupted
run resumes from ``.OUT.checkpoint`` beside the output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collab.zoo_build import DEFAULT_TARGETS, DomainExpertConfig
from routers.fusion import (
    SETTINGS,
    FusionError,
    distill_examples,
    read_fusion_table,
    table_file,
    table_name,
)

RECORD = "distill.json"
DATA = "distill_data.jsonl"


@dataclass
class DistillConfig:
    """How a distillation run trains (recorded in ``distill.json``)."""

    target: str = "zoo:smollm2-135m-instruct"
    """The model to fine-tune: zoo:NAME, a Hugging Face directory or a .gguf file."""
    k: int = 5
    """Correct responses of the pool per query, beside its gold answer."""
    setting: str = "perf"
    """perf (score, then length), judge (judge score, then length) or gold (the gold-only baseline)."""
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 5
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise FusionError(f"setting: expected one of {', '.join(SETTINGS)}, found {self.setting!r}")
        for name in ("steps", "batch_size", "rank", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FusionError(f"{name}: expected an integer >= 1, found {v!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise FusionError(f"k: expected an integer >= 0, found {self.k!r}")
        if not self.learning_rate > 0:
            raise FusionError(f"learning_rate: expected a positive number, found {self.learning_rate!r}")

    def trainer(self, n_examples: int) -> DomainExpertConfig:
        """The zoo trainer's config for this run."""
        return DomainExpertConfig(
            skill="distill", base=self.target, rank=self.rank, alpha=self.alpha, target_modules=list(self.target_modules),
            learning_rate=self.learning_rate, steps=self.steps, batch_size=self.batch_size, train_examples=n_examples,
            warmup_steps=self.warmup_steps, seed=self.seed, checkpoint_every=self.checkpoint_every, save_dtype="float32",
        )


def distill(
    table: str | Path,
    config: DistillConfig,
    out: str | Path,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``config.target`` on the distillation set of ``table`` (its first ``limit``
    rows) into the adapter directory ``out``; returns the run's record."""
    from collab import skills
    from collab.io import atomic_directory, atomic_write_json, sha256_file
    from collab.zoo_build import finish_adapter, train_lora

    out = Path(out)
    if out.exists() and not (overwrite and (out / RECORD).is_file()):
        raise FusionError(f"{out}: already exists" + (" (pass --overwrite to replace it)" if (out / RECORD).is_file() else f" and is not a distilled model ({RECORD} not found)"))
    t0 = time.perf_counter()
    rows = read_fusion_table(table, need_gold=True)
    if limit is not None:
        rows = rows[:limit]
    data = distill_examples(rows, config.k, config.setting)
    if len(data) < config.batch_size:
        raise FusionError(f"{table}: {len(data)} distillation examples, fewer than batch_size={config.batch_size}")
    examples = [skills.Example(id=d.id, skill="distill", question=d.prompt, answer=d.response) for d in data]
    tcfg = config.trainer(len(examples))
    ckpt = out.parent / f".{out.name}.checkpoint"
    table_sha256 = sha256_file(table_file(table))
    fingerprint = {"config": dataclasses.asdict(config), "table_sha256": table_sha256, "limit": limit}
    stamp = out.parent / f".{out.name}.checkpoint.json"
    if ckpt.exists() and stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) != fingerprint:
        raise FusionError(f"{ckpt}: the checkpoint of a run with other settings or another table; rerun with the same ones to resume, or delete it to start over")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, fingerprint)
    run = train_lora(tcfg, examples, progress=progress, checkpoint=ckpt)
    record = {
        "method": "FusionFactory model level (distillation of routing data)",
        "reference_url": "https://arxiv.org/abs/2507.10540",
        "config": dataclasses.asdict(config),
        "source": {"name": table_name(table), "sha256": table_sha256, "rows": len(rows)},
        "examples": len(data),
        "by_source": dict(sorted(Counter(d.source for d in data).items())),
        "losses": run.losses,
        "final_loss": sum(run.losses[-10:]) / max(1, len(run.losses[-10:])),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        run.model.save_pretrained(str(tmp), safe_serialization=True)
        finish_adapter(tmp, tcfg)
        (tmp / DATA).write_text("".join(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n" for d in data), encoding="utf-8")
        atomic_write_json(tmp / RECORD, record)
    shutil.rmtree(ckpt, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    return record
