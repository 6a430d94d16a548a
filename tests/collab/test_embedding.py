from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from collab.embedding import pooled_hidden_states
from collab.errors import CollabError
from collab.experts import Expert

TEXTS = ["The capital of France is Paris.", "def add(a, b):", "What is 12 * 3? It is 36. Hello there!", "Hi"]


@pytest.fixture(scope="module")
def deep_expert(tmp_path_factory: pytest.TempPathFactory) -> Expert:
    from tests.tiny import make_tiny_model

    return Expert.load(make_tiny_model(tmp_path_factory.mktemp("deep") / "m", layers=4), name="deep")


def _reference(e: Expert, text: str, layer: int) -> np.ndarray:
    ids = torch.tensor([e.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        hs = e.model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    return hs[layer][0].mean(0).numpy()


def test_pooled_states_equal_hf_hidden_states_unbatched(deep_expert: Expert) -> None:
    got = deep_expert.embed(TEXTS, [1, 3, 4], batch_size=3)
    h = deep_expert.model.config.hidden_size
    assert got.shape == (len(TEXTS), 3 * h)
    for i, t in enumerate(TEXTS):  # right padding: a batched text equals its single forward
        for b, layer in enumerate([1, 3, 4]):
            np.testing.assert_allclose(got[i, b * h : (b + 1) * h], _reference(deep_expert, t, layer), atol=2e-5)
    # Stopping after layer 2 gives the same layer-2 vectors as running the whole model.
    early = pooled_hidden_states(deep_expert.model, deep_expert.tokenizer, TEXTS, [2])
    np.testing.assert_allclose(early, np.stack([_reference(deep_expert, t, 2) for t in TEXTS]), atol=2e-5)


def test_pooled_states_bad_layers(deep_expert: Expert) -> None:
    with pytest.raises(CollabError, match=r"layers: expected numbers from 1 to 4 .*found \[0\]"):
        pooled_hidden_states(deep_expert.model, deep_expert.tokenizer, TEXTS, [0])
    with pytest.raises(CollabError, match=r"found \[2, 5\]"):
        pooled_hidden_states(deep_expert.model, deep_expert.tokenizer, TEXTS, [2, 5])


def test_lm_encoder_fits_saves_and_loads_with_a_router(deep_expert: Expert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLAB_CACHE", str(tmp_path / "cache"))
    from routers.base import Router, make_router
    from routers.encoders import LMEncoder
    from routers.table import RoutingTable

    model_dir = deep_expert.ref
    rows = [{"id": f"q{i}", "prompt": f"{TEXTS[i % 4]} ({i})", "task": "t", "scores": {"a": float(i % 2), "b": float(1 - i % 2)}, "costs": {"a": 1.0, "b": 2.0}} for i in range(24)]
    table = RoutingTable.from_rows(rows, source="mem")
    r = make_router("knn", k=3, encoder=f"tfidf+lm={model_dir}@2,4").fit(table)
    lm = r.encoder.parts[1]
    assert lm.config() == {"type": "lm", "model": model_dir, "layers": [2, 4], "max_tokens": 256}
    raw = pooled_hidden_states(deep_expert.model, deep_expert.tokenizer, table.prompts, [2, 4])
    np.testing.assert_allclose(lm.center, raw.mean(0), atol=1e-5)
    h = deep_expert.model.config.hidden_size
    z = lm.encode(table.prompts[:5])
    want = raw[:5, h:] - raw.mean(0)[h:]
    np.testing.assert_allclose(z[:, h:], want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-4)
    assert list((tmp_path / "cache" / "embeddings").glob("lm-*/*.safetensors"))  # raw vectors cached by content
    r.save(tmp_path / "r")
    back = Router.load(tmp_path / "r")
    assert back.encoder.parts[1].layers == (2, 4)
    probe = ["The capital of Italy is Rome.", "def sub(a, b):"]
    np.testing.assert_allclose(back.predict(probe), r.predict(probe))
    with pytest.raises(CollabError, match="lm encoder: not fitted"):
        LMEncoder(model_dir, (2,)).encode(["x"])
    with pytest.raises(CollabError, match=r"layers after '@' must be numbers"):
        make_router("knn", encoder="lm@seven").fit(table)
