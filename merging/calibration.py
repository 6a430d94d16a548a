"""Calibration data and the statistics data-aware merges need.

Texts come from a file the user names (``.txt``: paragraphs separated by blank
lines, or one per line; ``.jsonl``: a ``text`` field, or prompt/question plus
answer/output fields). Statistics stream through the model one sample at a time:
input Gram matrices are accumulated by forward pre-hooks on the linear layers as
each layer runs, so no layer's activations outlive its own forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collab.io import jsonl_rows
from merging.errors import MergeError

_PROMPT_KEYS = ("prompt", "question", "input", "instruction", "query")
_ANSWER_KEYS = ("answer", "output", "response", "completion")


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    """The first ``limit`` texts of a .txt or .jsonl calibration file."""
    if not path.exists():
        raise MergeError(f"{path}: calibration file not found")
    texts: list[str] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for i, row in jsonl_rows(path, MergeError):
            texts.append(_row_text(row, path, i))
            if limit is not None and len(texts) >= limit:
                break
    else:
        raw = path.read_text(encoding="utf-8")
        parts = [p.strip() for p in raw.split("\n\n")] if "\n\n" in raw.strip() else [p.strip() for p in raw.splitlines()]
        texts = [p for p in parts if p][:limit]
    if not texts:
        raise MergeError(f"{path}: no calibration texts found")
    return texts


def _row_text(row: Any, path: Path, line: int) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise MergeError(f"{path}:{line}: expected a JSON object or string, found {type(row).__name__}")
    if isinstance(row.get("text"), str):
        return row["text"]
    prompt = next((row[k] for k in _PROMPT_KEYS if isinstance(row.get(k), str)), None)
    answer = next((row[k] for k in _ANSWER_KEYS if isinstance(row.get(k), str)), None)
    if prompt is None and answer is None:
        raise MergeError(f"{path}:{line}: expected a 'text' field or one of {_PROMPT_KEYS + _ANSWER_KEYS}, found keys {sorted(row)}")
    return "\n".join(x for x in (prompt, answer) if x)


def _load(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    return model.eval(), tok


def _encode(tok: Any, text: str, max_length: int) -> Any:
    import torch

    ids = tok(text, truncation=True, max_length=max_length).input_ids
    return torch.tensor([ids])  # (1, T)


def fisher_diagonal(model_dir: Path, texts: list[str], max_length: int, advance: Any = None) -> dict[str, Any]:
    """Empirical diagonal Fisher: the mean over texts of the squared gradient of
    each text's log-likelihood, per parameter (same names and shapes as the
    checkpoint's tensors)."""
    import torch

    model, tok = _load(model_dir)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    used = 0
    for text in texts:
        ids = _encode(tok, text, max_length)
        if ids.shape[1] < 2:
            continue
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        (out.loss * (ids.shape[1] - 1)).backward()  # gradient of -log p(text)
        for n, p in params.items():
            if p.grad is not None:
                fisher[n].add_(p.grad.detach() ** 2)
        used += 1
        if advance is not None:
            advance(1)
    if used == 0:
        raise MergeError("calibration: every text is shorter than two tokens")
    del model
    return {n: f.div_(used) for n, f in fisher.items()}


def input_grams(model_dir: Path, texts: list[str], max_length: int, names: set[str], advance: Any = None) -> dict[str, Any]:
    """For each linear layer whose ``<module>.weight`` is in ``names``: the mean
    over tokens of x x^T for its inputs x, shape (in, in)."""
    import torch

    model, tok = _load(model_dir)
    grams: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(weight_name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            g = x.T @ x  # (in, in)
            if weight_name in grams:
                grams[weight_name].add_(g)
            else:
                grams[weight_name] = g
            counts[weight_name] = counts.get(weight_name, 0) + x.shape[0]

        return hook

    for mod_name, module in model.named_modules():
        w = f"{mod_name}.weight"
        if isinstance(module, torch.nn.Linear) and w in names:
            hooks.append(module.register_forward_pre_hook(hook_for(w)))
    try:
        with torch.inference_mode():
            for text in texts:
                ids = _encode(tok, text, max_length)
                model(input_ids=ids, use_cache=False)
                if advance is not None:
                    advance(1)
    finally:
        for h in hooks:
            h.remove()
    del model
    return {n: g / max(1, counts[n]) for n, g in grams.items()}
