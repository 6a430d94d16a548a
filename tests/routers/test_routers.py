from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from routers.base import REGISTRY, Router, RouterError, make_router, router_names
from routers.metrics import evaluate
from routers.table import RoutingTable

LEARNED = {
    "knn": {"encoder": "tfidf", "k": 10},
    "logreg": {"encoder": "tfidf", "c": 1.0},
    "mlp": {"encoder": "tfidf"},
    "mf": {"encoder": "tfidf"},
    "subject": {"encoder": "tfidf"},
    "subject-cluster": {"encoder": "tfidf", "mode": "cluster", "clusters": 4},
}


def test_registry_has_every_router() -> None:
    assert {"knn", "logreg", "mlp", "mf", "subject", "bert", "best-single", "random", "oracle", "ensemble"} <= set(router_names())
    for key, cls in REGISTRY.items():
        assert cls.__name__.endswith("Router") and cls.config_cls.__name__ == cls.__name__ + "Config"


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_learned_router_beats_best_single_and_roundtrips(name: str, synth_table: RoutingTable, tmp_path: Path) -> None:
    tr, te = synth_table.split(0.25, seed=0)
    r = make_router(name.split("-")[0], **LEARNED[name]).fit(tr)
    pred = r.predict(te.prompts)
    assert pred.shape == (len(te), 2) and (pred >= 0).all() and (pred <= 1).all()
    ev = evaluate(te, pred, n_boot=100).data
    assert ev["accuracy"] > ev["best_single"] + 0.1, ev
    r.save(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["type"] == name.split("-")[0] and cfg["experts"] == ["mathy", "histy"] and cfg["train_hash"] == tr.content_hash()
    assert cfg["encoder"]["type"] == "tfidf" and "hyperparameters" in cfg
    assert not list((tmp_path / "r").glob("*.pkl")) and (tmp_path / "r" / "router.safetensors").is_file()
    back = Router.load(tmp_path / "r")
    np.testing.assert_allclose(back.predict(te.prompts), pred, atol=1e-6)


def test_baselines(synth_table: RoutingTable) -> None:
    tr, te = synth_table.split(0.25, seed=0)
    best = make_router("best-single").fit(tr)
    assert (best.predict(te.prompts).argmax(1) == tr.scores.mean(0).argmax()).all()
    rnd = make_router("random", seed=1).fit(tr)
    a, b = rnd.predict(te.prompts), rnd.predict(te.prompts)
    np.testing.assert_array_equal(a, b)
    assert 0.2 < (a.argmax(1) == 0).mean() < 0.8
    orc = make_router("oracle").fit(te)
    ev = evaluate(te, orc.predict(te.prompts), n_boot=50).data
    assert ev["accuracy"] == ev["oracle"]
    with pytest.raises(RouterError, match="prompt not in the table"):
        orc.predict(["never seen"])


def test_ensemble_saves_members(synth_table: RoutingTable, tmp_path: Path) -> None:
    tr, te = synth_table.split(0.25, seed=0)
    members = [make_router("knn", encoder="tfidf", k=10).fit(tr), make_router("subject", encoder="tfidf").fit(tr)]
    from routers.learned import EnsembleRouter

    ens = EnsembleRouter(members=members).fit(tr)
    pred = ens.predict(te.prompts)
    np.testing.assert_allclose(pred, (members[0].predict(te.prompts) + members[1].predict(te.prompts)) / 2)
    ens.save(tmp_path / "e")
    assert (tmp_path / "e" / "member1" / "config.json").is_file()
    np.testing.assert_allclose(Router.load(tmp_path / "e").predict(te.prompts), pred)


def test_bad_router_inputs(tmp_path: Path) -> None:
    with pytest.raises(RouterError, match="unknown router 'svm'"):
        make_router("svm")
    with pytest.raises(RouterError, match="unknown option 'kk'"):
        make_router("knn", kk=3)
    with pytest.raises(RouterError, match="not found"):
        Router.load(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(RouterError, match="no config.json"):
        Router.load(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"type": "nope"}))
    with pytest.raises(RouterError, match="unknown router 'nope'"):
        Router.load(tmp_path / "x")


def test_minilm_encoder_caches_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLAB_CACHE", str(tmp_path))
    from routers.encoders import MiniLMEncoder

    enc = MiniLMEncoder()
    texts = [f"question number {i} about cats" for i in range(20)]
    a = enc.encode(texts)
    assert a.shape == (20, 384) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4)
    shards = list((tmp_path / "embeddings").rglob("*.safetensors"))
    assert len(shards) == 1
    fresh = MiniLMEncoder()  # a new process would see the same shard
    b = fresh.encode(texts[::-1])
    np.testing.assert_allclose(b, a[::-1], atol=1e-6)
    assert fresh._model is None  # served from disk, the model never loaded
    np.testing.assert_allclose(enc.encode_uncached(texts[:2]), a[:2], atol=1e-5)


@pytest.mark.slow
def test_bert_router_learns(synth_table: RoutingTable, tmp_path: Path) -> None:
    tr, te = synth_table.split(0.25, seed=0)
    r = make_router("bert", epochs=3, batch_size=16).fit(tr)
    pred = r.predict(te.prompts)
    ev = evaluate(te, pred, n_boot=50).data
    assert ev["accuracy"] > ev["best_single"] + 0.1
    r.save(tmp_path / "b")
    size = sum(p.stat().st_size for p in (tmp_path / "b").iterdir())
    assert size < 20e6  # only the top layers and the head are stored
    np.testing.assert_allclose(Router.load(tmp_path / "b").predict(te.prompts), pred, atol=1e-5)
