"""Tiny heterogeneous experts: two architectures, widths, depths and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def make_tiny_qwen(path: Path, *, seed: int = 3, hidden_size: int = 48, layers: int = 3) -> Path:
    """A tiny random Qwen2 with its own BPE tokenizer (a smaller vocabulary, no chat template)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tiny import make_tokenizer

    tok = make_tokenizer(chat_template=False, vocab_size=320)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def mot_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny Llama (hidden 32, 2 layers, chat template), a tiny Qwen2 (hidden 48,
    3 layers, another tokenizer, plain prompts) and a second tiny Llama."""
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("mot")
    return [
        make_tiny_model(root / "llama", seed=0),
        make_tiny_qwen(root / "qwen"),
        make_tiny_model(root / "llama2", seed=7, hidden_size=40, layers=3, heads=4, kv_heads=2),
    ]


@pytest.fixture(scope="session")
def mot_experts(mot_dirs: list[Path]) -> list[Any]:
    from collab.experts import Expert

    return [Expert.load(d, name=n) for d, n in zip(mot_dirs, ("llama", "qwen", "llama2"))]


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mot-data") / "train.jsonl"
    rows = [{"prompt": f"What is {a} + {a}?", "response": f"It is {2 * a}."} for a in range(10)]
    rows += [{"messages": [{"role": "user", "content": f"Reverse the list [{a}, {a + 1}]."}, {"role": "assistant", "content": f"[{a + 1}, {a}]"}]} for a in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_mixture(experts: list[Any], *, gate: float = 0.0, top_k: int = 2, stacks: int = 2, seed: int = 0, favour: int | None = None, name: str = "mot") -> Any:
    """An untrained mixture with random interaction layers whose gates are all ``gate``
    (tanh(gate) lets the cross-attention through); ``favour`` makes the router pick
    that expert as the primary for every query."""
    import torch

    from collab.latent.artefact import LatentConfig
    from collab.latent.model import Interactions, expert_shape
    from collab.latent.router import LatentRouter
    from collab.latent.system import MixtureOfThoughts

    torch.manual_seed(seed)
    shapes = [expert_shape(e) for e in experts]
    interactions = Interactions(shapes, stacks, 16, 2)
    with torch.no_grad():
        for per in interactions.layers:
            for layer in per:
                layer.gate.fill_(gate)
    router = LatentRouter(64, len(experts), hidden=16)
    if favour is not None:
        with torch.no_grad():
            router.net[-1].bias[favour] = 100.0
    config = LatentConfig(
        experts=[{"name": e.name, "ref": str(e.ref), "hidden_size": d, "layers": n, "cuts": c} for e, (d, n), c in zip(experts, shapes, interactions.cuts)],
        stacks=stacks, top_k=top_k, latent_dim=16, heads=2, encoder={"type": "ngram", "dim": 64}, router_hidden=16,
    )
    return MixtureOfThoughts(experts, router, interactions, config, name=name)


def weights_digest(expert: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(expert.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
