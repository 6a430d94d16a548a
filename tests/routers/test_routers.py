from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from collab.errors import CollabError
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
    "partition": {"encoder": "tfidf", "clusters": [2, 4], "repeats": 3, "grid_clusters": [[2], [4], [2, 4]], "grid_view": ["all"]},
}


def test_registry_has_every_router() -> None:
    assert {"knn", "logreg", "mlp", "mf", "subject", "bert", "best-single", "random", "oracle", "ensemble", "partition"} <= set(router_names())
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
    # Options of the wrong kind are refused by name, before any training.
    with pytest.raises(RouterError, match="option 'k': expected an integer, found 'abc'"):
        make_router("knn", k="abc")
    with pytest.raises(RouterError, match="option 'k': expected an integer, found 2.5"):
        make_router("knn", k=2.5)
    with pytest.raises(RouterError, match="option 'select': expected true or false, found 1"):
        make_router("partition", select=1)
    with pytest.raises(RouterError, match="option 'weighting': expected a string, found 3"):
        make_router("knn", weighting=3)
    assert make_router("knn", temperature=1).config.temperature == 1.0 and isinstance(make_router("knn", temperature=1).config.temperature, float)
    assert make_router("partition", clusters=24).config.clusters == (24,)
    assert make_router("ensemble", members="knn").config.members == ("knn",)
    with pytest.raises(RouterError, match="not found"):
        Router.load(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(RouterError, match="no config.json"):
        Router.load(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"type": "nope"}))
    with pytest.raises(RouterError, match="unknown router 'nope'"):
        Router.load(tmp_path / "x")


@pytest.mark.parametrize(
    "key, options, message",
    [
        ("knn", {"k": 0}, "router 'knn': option 'k': expected an integer >= 1, found 0"),
        ("knn", {"temperature": 0.0}, "router 'knn': option 'temperature': expected a number > 0, found 0.0"),
        ("knn", {"seed": -1}, "router 'knn': option 'seed': expected an integer >= 0, found -1"),
        ("subject", {"clusters": 0}, "router 'subject': option 'clusters': expected an integer >= 1, found 0"),
        ("partition", {"clusters": [0, 4]}, "router 'partition': option 'clusters': expected numbers each >= 1, found 0 in [0, 4]"),
        ("partition", {"validation": 1.0}, "router 'partition': option 'validation': expected a number in (0, 1), found 1.0"),
        ("guarded", {"low": 1.5}, "router 'guarded': option 'low': expected a number in [0, 1], found 1.5"),
        ("mlp", {"dropout": 1.0}, "router 'mlp': option 'dropout': expected a number in [0, 1), found 1.0"),
        ("mf", {"lr": 0}, "router 'mf': option 'lr': expected a number > 0, found 0.0"),
        ("bert", {"batch_size": 0}, "router 'bert': option 'batch_size': expected an integer >= 1, found 0"),
        ("ensemble", {"weights": [1, -1]}, "router 'ensemble': option 'weights': expected numbers each >= 0, found -1 in [1, -1]"),
    ],
)
def test_options_out_of_range_are_refused_by_name(key: str, options: dict, message: str) -> None:
    with pytest.raises(RouterError) as e:
        make_router(key, **options)
    assert str(e.value) == message


def test_every_numeric_option_declares_its_range(synth_table: RoutingTable) -> None:
    """A new numeric option cannot skip the range check; and a config built by hand is checked at fit."""
    import dataclasses
    import re
    import typing

    from routers.base import option_bounds
    from routers.learned import KNNRouter, KNNRouterConfig

    for key, cls in REGISTRY.items():
        hints = typing.get_type_hints(cls.config_cls)
        numeric = [f.name for f in dataclasses.fields(cls.config_cls) if re.search(r"\b(int|float)\b", str(hints[f.name]))]
        assert set(numeric) <= set(option_bounds(cls.config_cls)), (key, sorted(set(numeric) - set(option_bounds(cls.config_cls))))
    with pytest.raises(RouterError, match="option 'k': expected an integer >= 1, found 0"):
        KNNRouter(KNNRouterConfig(encoder="tfidf", k=0)).fit(synth_table)
    from routers.learned import EnsembleRouter

    members = [make_router("knn", encoder="tfidf", k=5).fit(synth_table), make_router("subject", encoder="tfidf").fit(synth_table)]
    with pytest.raises(RouterError, match=r"option 'weights': expected at least one weight > 0, found \[0, 0\]"):
        EnsembleRouter(make_router("ensemble", weights=[0, 0]).config, members=members).fit(synth_table).predict(["add the sum"])


def _tiny_sentence_encoder(path: Path) -> Path:
    """A randomly initialised one-layer BERT (16-d) in a directory sentence-transformers
    loads with mean pooling: the MiniLM encoder's code path without the real model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", "number", "about", "cats"] + [str(i) for i in range(20)]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(path))
    return path


def test_sentence_encoder_caches_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding cache, on a tiny random encoder: a shard per batch, served from disk
    by a fresh encoder without loading the model, equal to the uncached pass."""
    monkeypatch.setenv("COLLAB_CACHE", str(tmp_path / "cache"))
    from routers.encoders import MiniLMEncoder

    model = str(_tiny_sentence_encoder(tmp_path / "tiny"))
    enc = MiniLMEncoder(model=model)
    texts = [f"question number {i} about cats" for i in range(20)]
    a = enc.encode(texts)
    assert a.shape == (20, 16) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4)
    assert len({tuple(np.round(v, 5)) for v in a}) > 1  # not one constant vector
    shards = list((tmp_path / "cache" / "embeddings").rglob("*.safetensors"))
    assert len(shards) == 1
    fresh = MiniLMEncoder(model=model)
    b = fresh.encode(texts[::-1])
    np.testing.assert_allclose(b, a[::-1], atol=1e-6)
    assert fresh._model is None  # served from disk, the model never loaded
    np.testing.assert_allclose(enc.encode_uncached(texts[:2]), a[:2], atol=1e-5)


@pytest.mark.slow
def test_minilm_encoder_caches_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the zoo's real MiniLM (384-d)."""
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


def test_to_device_reaches_every_encoder(synth_table: RoutingTable) -> None:
    import torch

    from routers.encoders import ConcatEncoder, MiniLMEncoder, TfidfEncoder
    from routers.guard import GuardedRouter
    from routers.learned import EnsembleRouter

    knn, sub = make_router("knn"), make_router("subject")
    knn.encoder = MiniLMEncoder(cache=False)
    sub.encoder = ConcatEncoder([MiniLMEncoder(cache=False), TfidfEncoder()])
    guard = GuardedRouter(base=EnsembleRouter(members=[knn, sub]))
    guard.encoder = MiniLMEncoder(cache=False)
    assert guard.to("auto") is guard
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert [guard.encoder.device, knn.encoder.device, sub.encoder.parts[0].device] == [want] * 3
    with pytest.raises(CollabError, match="expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', found 'tpu'"):
        knn.to("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CollabError, match="'cuda:0': this torch build sees no CUDA device"):
            guard.to("cuda:0")
        assert knn.encoder.device == "cpu"  # a refused move changes nothing


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


def test_partition_selects_on_validation_only(synth_table: RoutingTable, tmp_path: Path) -> None:
    """The grid search sees only the training table; its choice is recorded and reloaded."""
    tr, te = synth_table.split(0.25, seed=0)
    r = make_router("partition", encoder="tfidf", repeats=2, grid_clusters=[[2], [3]], grid_smoothing=[1.0, 50.0], grid_view=["all", "first"]).fit(tr)
    val = r.meta["validation"]
    assert val["queries"] < len(tr) and len(val["grid"]) == 2 * 2 * 2
    assert [r.config.view, list(r.config.clusters), r.config.smoothing] == [val["grid"][0]["view"], val["grid"][0]["clusters"], val["grid"][0]["smoothing"]]
    assert len(r.offsets) - 1 == 2 * len(r.config.clusters)  # repeats x chosen cluster counts
    r.save(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["hyperparameters"]["clusters"] == list(r.config.clusters)
    back = Router.load(tmp_path / "p")
    np.testing.assert_allclose(back.predict(te.prompts), r.predict(te.prompts), atol=1e-6)
    fixed = make_router("partition", encoder="tfidf", select=False, clusters=[3], repeats=2).fit(tr)
    assert "validation" not in fixed.meta and fixed.config.clusters == [3]


def test_partition_is_an_average_of_cell_means(synth_table: RoutingTable) -> None:
    """One partition with one cell and no smoothing predicts the training means."""
    tr, te = synth_table.split(0.25, seed=0)
    r = make_router("partition", encoder="tfidf", select=False, clusters=[1], repeats=1, smoothing=0.0).fit(tr)
    np.testing.assert_allclose(r.predict(te.prompts[:3]), np.tile(tr.scores.mean(0), (3, 1)), atol=1e-9)


def test_tfidf_direct_path_equals_sklearn(synth_table: RoutingTable) -> None:
    """Single prompts skip sklearn's vectoriser; the vectors must be the same."""
    from routers.encoders import TfidfEncoder

    enc = TfidfEncoder(dim=16).fit(synth_table.prompts)
    texts = synth_table.prompts[:20] + ["", "unseen words only", "Please ADD the sum, and the sum!"]
    direct = np.stack([enc.encode([t])[0] for t in texts])
    enc.direct_max = 0
    np.testing.assert_allclose(direct, enc.encode(texts), atol=1e-5)


def test_knn_similarities_same_with_and_without_torch(synth_table: RoutingTable) -> None:
    import sys

    import torch  # noqa: F401 - loaded, so the torch path is taken

    from routers import learned

    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((50, 8)).astype(np.float32)
    np.testing.assert_allclose(learned._similarities(x, t), x @ t.T, atol=1e-5)
    saved = sys.modules.pop("torch")
    try:
        np.testing.assert_allclose(learned._similarities(x, t), x @ t.T, atol=1e-6)
    finally:
        sys.modules["torch"] = saved


class _LookupEncoder:
    """Fixed vectors per prompt: lets a test decide exactly what the features carry."""

    name = "lookup"

    def __init__(self, vectors: dict[str, np.ndarray], tag: str) -> None:
        self.vectors, self.tag = vectors, tag

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)

    def config(self) -> dict:
        return {"type": "lookup", "tag": self.tag}


def _buried_signal_table(n: int = 400, noise_dims: int = 100) -> tuple[RoutingTable, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Expert 'a' is right when feature 0 is positive, 'b' otherwise; feature 0 is one of
    a hundred equally large features, so cosine neighbours are mostly noise. A second block
    of pure noise stands in for a second encoder part."""
    rng = np.random.default_rng(0)
    sign = rng.choice([-1.0, 1.0], size=n)
    noise = rng.standard_normal((n, noise_dims))
    rows, signal, other = [], {}, {}
    for i in range(n):
        p = f"prompt {i}"
        signal[p] = np.concatenate([[sign[i]], noise[i]])
        other[p] = rng.standard_normal(8)
        a = 1.0 if sign[i] > 0 else 0.0
        rows.append({"id": f"q{i}", "task": "t", "prompt": p, "scores": {"a": a, "b": 1.0 - a}, "costs": {"a": 1.0, "b": 1.0}})
    return RoutingTable.from_rows(rows, source="buried"), signal, other


def test_knn_projection_finds_a_buried_signal_and_roundtrips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from routers import encoders

    table, signal, other = _buried_signal_table()
    make = encoders.make_encoder

    def lookup(spec: object) -> object:
        if spec in ("signal", {"type": "lookup", "tag": "signal"}):
            return _LookupEncoder(signal, "signal")
        if spec == {"type": "lookup", "tag": "other"}:
            return _LookupEncoder(other, "other")
        if spec == "other+signal":
            return encoders.ConcatEncoder([_LookupEncoder(other, "other"), _LookupEncoder(signal, "signal")])
        return make(spec)

    monkeypatch.setattr(encoders, "make_encoder", lookup)
    tr, te = table.split(0.25, seed=0)
    plain = make_router("knn", encoder="signal", k=15).fit(tr)
    projected = make_router("knn", encoder="signal", k=15, project=2, project_weight=2.0).fit(tr)
    acc_plain = evaluate(te, plain.predict(te.prompts), n_boot=10).data["accuracy"]
    acc_proj = evaluate(te, projected.predict(te.prompts), n_boot=10).data["accuracy"]
    assert acc_plain < 0.8 and acc_proj > 0.95, (acc_plain, acc_proj)
    assert projected.proj_rotation.shape == (101, 2)
    # The first PLS direction is (almost) the signal feature.
    assert abs(projected.proj_rotation[0, 0]) / np.linalg.norm(projected.proj_rotation[:, 0]) > 0.5

    # Beside a second, pure-noise part (a '+'-joined encoder), the projection still finds the signal.
    both = make_router("knn", encoder="other+signal", k=15, project=2, project_weight=2.0).fit(tr)
    assert both.proj_rotation.shape == (109, 2)
    assert evaluate(te, both.predict(te.prompts), n_boot=10).data["accuracy"] > 0.95

    loaded = Router.load(both.save(tmp_path / "r"))
    assert loaded.config.project == 2 and loaded.config.project_weight == 2.0
    np.testing.assert_allclose(loaded.predict(te.prompts), both.predict(te.prompts), atol=1e-6)
    plain_loaded = Router.load(plain.save(tmp_path / "plain"))
    assert plain_loaded.proj_rotation is None
    np.testing.assert_allclose(plain_loaded.predict(te.prompts), plain.predict(te.prompts), atol=1e-6)

    with pytest.raises(RouterError, match="option 'project': expected an integer >= 0, found -1"):
        make_router("knn", encoder="signal", project=-1).fit(tr)
    flat = RoutingTable.from_rows([{**r, "scores": {"a": 1.0, "b": 1.0}} for r in tr.rows()], source="flat")
    with pytest.raises(RouterError, match="every expert scores the same"):
        make_router("knn", encoder="signal", project=2).fit(flat)


def test_knn_reduce_keeps_the_neighbours_of_low_rank_features_and_roundtrips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Features spanning 4 of 60 dimensions: 4 principal directions give the same
    similarities, so the same predictions, from a 15x smaller training matrix; 2
    directions lose information and change some predictions."""
    from routers import encoders

    rng = np.random.default_rng(1)
    table, _, _ = _buried_signal_table(n=300)
    mix = rng.standard_normal((4, 60))
    low = {p: rng.standard_normal(4) @ mix for p in table.prompts}
    monkeypatch.setattr(encoders, "make_encoder", lambda spec: _LookupEncoder(low, "low"))
    tr, te = table.split(0.25, seed=0)
    full = make_router("knn", encoder="low", k=10).fit(tr)
    reduced = make_router("knn", encoder="low", k=10, reduce=4).fit(tr)
    assert full.train_x.shape == (len(tr), 60) and reduced.train_x.shape == (len(tr), 4)
    assert reduced.basis.shape == (60, 4)
    np.testing.assert_allclose(reduced.predict(te.prompts), full.predict(te.prompts), atol=1e-5)
    two = make_router("knn", encoder="low", k=10, reduce=2).fit(tr)
    assert np.abs(two.predict(te.prompts) - full.predict(te.prompts)).max() > 0.05

    loaded = Router.load(reduced.save(tmp_path / "r"))
    assert loaded.config.reduce == 4
    np.testing.assert_allclose(loaded.predict(te.prompts), reduced.predict(te.prompts), atol=1e-6)
    # reduce >= the dimension keeps the full vectors.
    assert make_router("knn", encoder="low", reduce=60).fit(tr).basis is None
    with pytest.raises(RouterError, match="option 'reduce': expected an integer >= 0, found -1"):
        make_router("knn", encoder="low", reduce=-1).fit(tr)
