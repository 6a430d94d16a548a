"""The population router (L2D-Pop) and ``collab route add-expert``: the invariants of the
issue (order of the context, the empty context, no parameter change, the budget, disjoint
episodes), that a new expert is routed to from a few demonstrations, and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from collab.cli import app
from collab.io import sha256_file
from routers.base import Router, RouterError, make_router
from routers.policies import BudgetPolicy
from routers.population import (
    PopulationRouter,
    context_size,
    distinct_prompt_rows,
    pseudo_label,
    sample_episode,
)
from routers.table import RoutingTable

runner = CliRunner()

TOPICS = {
    "math": [
        "add",
        "multiply",
        "divide",
        "subtract",
        "integral",
        "equation",
        "sum",
        "product",
    ],
    "hist": [
        "emperor",
        "war",
        "dynasty",
        "revolution",
        "treaty",
        "kingdom",
        "battle",
        "empire",
    ],
    "code": [
        "python",
        "function",
        "loop",
        "compile",
        "variable",
        "class",
        "bug",
        "array",
    ],
    "food": ["recipe", "bake", "flour", "sauce", "oven", "spice", "bread", "soup"],
}
#: P(right) of each expert per topic (0.15 elsewhere); 'coder' is the one added from demonstrations.
SKILLS = {
    "mathy": {"math": 0.9},
    "histy": {"hist": 0.9},
    "cooky": {"food": 0.9},
    "both": {"math": 0.8, "hist": 0.8},
    "weak": {},
    "coder": {"code": 0.95},
}
KNOWN = ["mathy", "histy", "cooky", "both", "weak"]
TINY = {
    "encoder": "tfidf",
    "hidden": 32,
    "embed": 16,
    "heads": 2,
    "steps": 200,
    "episodes": 16,
    "targets": 16,
    "eval_every": 50,
    "synthetic_clusters": 4,
}


def population_rows(n: int, seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        topic = list(TOPICS)[i % 4]
        w = rng.sample(TOPICS[topic], 3)
        prompt = f"{w[0]} the {w[1]} with {w[2]} number {rng.randint(1, 999)}"
        scores = {
            e: float(rng.random() < s.get(topic, 0.15)) for e, s in SKILLS.items()
        }
        out.append(
            {
                "id": f"q{i}",
                "task": topic,
                "prompt": prompt,
                "scores": scores,
                "costs": {e: 4.0 if e == "coder" else 1.0 for e in SKILLS},
            }
        )
    return out


@pytest.fixture(scope="module")
def table() -> RoutingTable:
    return RoutingTable.from_rows(population_rows(320), source="population")


@pytest.fixture(scope="module")
def test_table() -> RoutingTable:
    return RoutingTable.from_rows(
        population_rows(160, seed=1, start=1000), source="population-test"
    )


@pytest.fixture(scope="module", params=["attention", "mean"])
def fitted(request: pytest.FixtureRequest, table: RoutingTable) -> PopulationRouter:
    r = make_router("population", pooling=request.param, **TINY).fit(
        table.select_experts(KNOWN)
    )
    assert isinstance(r, PopulationRouter)
    return r


def _demos(table: RoutingTable, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(table), n, replace=False)


# ------------------------------------------------------------------ invariants
def test_episodes_never_share_a_prompt_between_context_and_targets() -> None:
    from routers.population import PopulationRouterConfig

    prompts = [f"p{i % 70}" for i in range(100)]  # 30 prompts appear twice
    reps = distinct_prompt_rows(prompts)
    assert len(reps) == 70 and len({prompts[i] for i in reps}) == 70
    rng = np.random.default_rng(0)
    cfg = PopulationRouterConfig(empty_share=0.2)
    sizes = []
    for _ in range(500):
        size = context_size(rng, cfg, len(reps))
        sizes.append(size)
        ctx, tgt = sample_episode(rng, reps, size, 32)
        assert len(ctx) == size and len(tgt) == min(32, len(reps) - size)
        assert not {prompts[i] for i in ctx} & {prompts[i] for i in tgt}
        assert len(set(ctx)) == len(ctx) and len(set(tgt)) == len(tgt)
    assert (
        0 in sizes
        and min(s for s in sizes if s) >= 10
        and max(sizes) <= 50
        and len(set(sizes)) > 20
    )
    # with a separate target pool (validation): still disjoint, also when the pools overlap
    for _ in range(100):
        ctx, tgt = sample_episode(rng, reps[:50], 40, 32, target_pool=reps[30:])
        assert not set(ctx) & set(tgt)


def test_expert_embedding_ignores_the_order_of_the_context(
    fitted: PopulationRouter, table: RoutingTable, test_table: RoutingTable
) -> None:
    idx = _demos(table, 30)
    x, y = (
        fitted.features([table.prompts[i] for i in idx]),
        table.scores[idx, table.experts.index("coder")],
    )
    xq = fitted.features(test_table.prompts[:20])
    perm = np.random.default_rng(1).permutation(len(idx))
    a, b = fitted.embedding(x, y, xq), fitted.embedding(x[perm], y[perm], xq)
    assert np.abs(a).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(
        fitted.context_scores(xq, x, y),
        fitted.context_scores(xq, x[perm], y[perm]),
        atol=1e-6,
    )
    # and a different context gives a different embedding
    assert np.abs(fitted.embedding(x, 1 - y, xq) - a).max() > 1e-3


def test_empty_context_gives_the_population_agnostic_router(
    fitted: PopulationRouter, table: RoutingTable, test_table: RoutingTable
) -> None:
    xq = fitted.features(test_table.prompts)
    d = int(fitted.meta["input_dim"])
    empty_x, empty_y = np.zeros((0, d), dtype=np.float32), np.zeros(0, dtype=np.float32)
    assert not np.any(fitted.embedding(empty_x, empty_y, xq[:3]))
    agnostic = fitted.agnostic(xq)
    np.testing.assert_allclose(
        fitted.context_scores(xq, empty_x, empty_y), agnostic, atol=1e-7
    )
    # two experts known by nothing get the same scores: the prediction depends on the query only
    r = fitted
    before = len(r.experts)
    r.add_context("nobody-a", empty_x, empty_y)
    r.add_context("nobody-b", empty_x, empty_y)
    try:
        p = r.predict(test_table.prompts)
        np.testing.assert_allclose(p[:, -1], p[:, -2], atol=1e-7)
        np.testing.assert_allclose(p[:, -1], agnostic, atol=1e-6)
    finally:
        _drop_added(r, before)
    # it is the population's rate (meta-training's population: the table's experts and the
    # synthetic ones made from them), lowest on code, which no known expert is good at
    known = table.select_experts(KNOWN).scores
    assert abs(float(agnostic.mean()) - float(known.mean())) < 0.1
    topic = np.array(test_table.tasks)
    assert agnostic[topic == "code"].mean() < min(
        agnostic[topic == t].mean() for t in ("math", "hist")
    )


def _add_coder(r: PopulationRouter, table: RoutingTable, idx: np.ndarray) -> None:
    """Add the table's 'coder' as a new expert from its rows ``idx`` (its demonstrations)."""
    r.add_context("coder", r.features([table.prompts[i] for i in idx]), table.scores[idx, table.experts.index("coder")])


def _drop_added(r: PopulationRouter, keep: int) -> None:
    """Undo in-memory add_context calls (the module-scoped fixture is shared)."""
    del r.experts[keep:], r.ctx_rows[keep:], r.ctx_y[keep:], r.ctx_info[keep:]
    r._cache = {k: v for k, v in r._cache.items() if k < keep}


def test_adding_an_expert_changes_no_parameter(
    fitted: PopulationRouter, table: RoutingTable, test_table: RoutingTable
) -> None:
    before = {k: v.detach().clone() for k, v in fitted.net.state_dict().items()}
    old = fitted.predict(test_table.prompts)
    n = len(fitted.experts)
    idx = _demos(table, 20)
    _add_coder(fitted, table, idx)
    try:
        after = fitted.net.state_dict()
        assert before.keys() == after.keys() and all(
            bool((before[k] == after[k]).all()) for k in before
        )
        new = fitted.predict(test_table.prompts)
        assert new.shape == (len(test_table), n + 1)
        np.testing.assert_allclose(
            new[:, :n], old, atol=1e-7
        )  # the known experts' scores stay as they were
    finally:
        _drop_added(fitted, n)


def test_deferrals_never_exceed_the_budget(
    fitted: PopulationRouter, table: RoutingTable, test_table: RoutingTable
) -> None:
    """The budget policy over the router's scores, with the added expert among them: the
    budgeted expert (the one the best policy would use most) never gets more than its share."""
    n = len(fitted.experts)
    idx = _demos(table, 30)
    _add_coder(fitted, table, idx)
    try:
        pred = fitted.predict(test_table.prompts)
        assert pred.shape[1] == n + 1
        for expensive in (n, int(np.bincount(pred.argmax(1)).argmax())):
            free = (pred.argmax(1) == expensive).mean()
            for share in (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0):
                policy = BudgetPolicy(expensive=expensive, share=share).calibrate(pred)
                used = (policy.choices(pred) == expensive).mean()
                assert used <= share + 1e-12, (expensive, share, used)
                assert (
                    np.array(
                        [d.ranking[0] for d in policy.decide(pred, fitted.experts)]
                    )
                    == expensive
                ).mean() == used
                if share < free:
                    assert (
                        used > share - 0.02
                    )  # binding: it spends the budget, not less
    finally:
        _drop_added(fitted, n)


# ------------------------------------------------------------ behaviour
def test_a_new_expert_from_twenty_demonstrations_gets_its_topic(
    table: RoutingTable, test_table: RoutingTable
) -> None:
    """Routing code prompts to the added coder: from 20 demonstrations, with no weight change."""
    r = make_router("population", pooling="attention", **TINY).fit(
        table.select_experts(KNOWN)
    )
    te = test_table.select_experts(KNOWN)
    code = np.array(test_table.tasks) == "code"
    without = te.scores[np.arange(len(te)), r.predict(te.prompts).argmax(1)].mean()
    idx = _demos(table, 20, seed=3)
    _add_coder(r, table, idx)
    full = test_table.select_experts(r.experts)
    choice = r.predict(full.prompts).argmax(1)
    assert (choice[code] == len(KNOWN)).mean() > 0.6
    assert (choice[~code] == len(KNOWN)).mean() < 0.2
    assert full.scores[np.arange(len(full)), choice].mean() > without + 0.1


def test_pseudo_labels_follow_the_demonstrations() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:2] * 3
    pool = np.concatenate(
        [
            centres[0] + rng.normal(0, 0.3, (100, 8)),
            centres[1] + rng.normal(0, 0.3, (100, 8)),
        ]
    ).astype(np.float32)
    truth = np.repeat([1.0, 0.0], 100)
    demo_i = np.concatenate(
        [rng.choice(100, 5, replace=False), 100 + rng.choice(100, 5, replace=False)]
    )
    rows, labels = pseudo_label(
        pool[demo_i], truth[demo_i], np.delete(pool, demo_i, axis=0), 40, k=5
    )
    rest_truth = np.delete(truth, demo_i)
    assert (
        len(rows) == 40 and len(set(rows)) == 40 and labels.mean() == 0.5
    )  # the demonstrations' share of right answers
    assert (labels == rest_truth[rows]).mean() >= 0.95
    none, _ = pseudo_label(
        pool[demo_i], np.ones(10), pool, 40
    )  # one class: nothing to tell apart
    assert len(none) == 0


def test_save_load_and_no_pickle(
    fitted: PopulationRouter, tmp_path: Path, test_table: RoutingTable
) -> None:
    fitted.save(tmp_path / "r")
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == [
        "config.json",
        "contexts.json",
        "contexts.safetensors",
        "router.safetensors",
        "train_prompts.sha256",
    ]
    back = Router.load(tmp_path / "r")
    assert isinstance(back, PopulationRouter) and back.experts == fitted.experts
    np.testing.assert_allclose(
        back.predict(test_table.prompts), fitted.predict(test_table.prompts), atol=1e-6
    )
    (tmp_path / "r" / "contexts.json").unlink()
    with pytest.raises(
        RouterError, match="needs contexts.json and contexts.safetensors"
    ):
        Router.load(tmp_path / "r")


def test_options_are_checked() -> None:
    with pytest.raises(
        RouterError, match="option 'heads': expected a divisor of embed=16, found 3"
    ):
        make_router("population", encoder="tfidf", embed=16, heads=3).fit(
            RoutingTable.from_rows(population_rows(40))
        )
    with pytest.raises(
        RouterError, match="pooling: expected 'mean' or 'attention', found 'max'"
    ):
        make_router("population", encoder="tfidf", pooling="max").fit(
            RoutingTable.from_rows(population_rows(40))
        )
    with pytest.raises(
        RouterError, match="option 'context_max': expected an integer >= 1, found 0"
    ):
        make_router("population", context_max=0)


# ------------------------------------------------------------------ CLI
def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained_dir(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("population")
    rows = population_rows(320)
    known = _write(
        root / "known.jsonl",
        [
            {
                **r,
                "scores": {e: r["scores"][e] for e in KNOWN},
                "costs": {e: r["costs"][e] for e in KNOWN},
            }
            for r in rows
        ],
    )
    out = root / "pop"
    opts = [x for k, v in TINY.items() for x in ("-o", f"{k}={v}")]
    r = runner.invoke(
        app,
        [
            "route",
            "train",
            "--data",
            str(known),
            "--router",
            "population",
            "--out",
            str(out),
            "--test-size",
            "0.25",
            *opts,
        ],
    )
    assert r.exit_code == 0, r.output
    return out, rows


def test_cli_add_expert_then_eval_ask_and_spec(
    trained_dir: tuple[Path, list[dict[str, Any]]], tmp_path: Path, tiny_model_dir: Path
) -> None:
    src, rows = trained_dir
    weights = sha256_file(src / "router.safetensors")
    held = set((src / "heldout_ids.txt").read_text().split())
    # demonstrations: 20 rows that score only the new expert, two of them held-out rows
    demo_rows = [r for r in rows if r["id"] not in held][:18] + [
        r for r in rows if r["id"] in held
    ][:2]
    demos = _write(
        tmp_path / "demos.jsonl",
        [
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "scores": {"coder": r["scores"]["coder"]},
                "costs": {"coder": 4.0},
            }
            for r in demo_rows
        ],
    )
    out = tmp_path / "pop-coder"
    r = runner.invoke(
        app,
        [
            "route",
            "add-expert",
            "--router",
            str(src),
            "--expert",
            "coder",
            "--demos",
            str(demos),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "added expert 'coder' from 20 demonstrations" in r.output
        and "weights unchanged" in r.output
    )
    assert (
        sha256_file(out / "router.safetensors")
        == weights
        == sha256_file(src / "router.safetensors")
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["type"] == "population" and cfg["experts"] == [*KNOWN, "coder"]
    assert (
        cfg["meta"]["train_mean_costs"][-1] == 4.0
        and cfg["meta"]["added_experts"][0]["demonstrations"] == 20
    )
    assert (
        json.loads((src / "config.json").read_text())["experts"] == KNOWN
    )  # --out leaves the source as it was
    new_held = set((out / "heldout_ids.txt").read_text().split())
    assert new_held == held - {
        demo_rows[-1]["id"],
        demo_rows[-2]["id"],
    }  # demonstrations are never scored

    # route eval on a table with the new expert: its held-out rows, less the two demonstrations
    table = _write(tmp_path / "full.jsonl", rows)
    r = runner.invoke(
        app, ["route", "eval", "--router", str(out), "--data", str(table), "--json"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["queries"] == len(held) - 2 and set(d["experts"]) == {*KNOWN, "coder"}
    assert d["experts"]["coder"]["share"] > 0.1 and d["accuracy"] > d["best_single"]

    # route ask and a spec's type: route send a code prompt to the new expert
    r = runner.invoke(
        app,
        [
            "route",
            "ask",
            "--router",
            str(out),
            "python the function with loop number 7",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["routed_to"] == "coder"
    # the cost policy weighs the new expert's cost from its demonstrations (4) beside the others' (1)
    r = runner.invoke(
        app,
        [
            "route",
            "ask",
            "--router",
            str(out),
            "python the function with loop number 7",
            "--policy",
            "cost:1",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    asked = json.loads(r.output)
    assert asked["costs"]["coder"] == 4.0 and asked["routed_to"] != "coder"
    from collab.spec import load_spec
    from collab.system import GenerationRequest

    names = [*KNOWN, "coder"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "experts:\n"
        + "".join(f"  {e}: {{ref: {tiny_model_dir}}}\n" for e in names)
        + f"systems:\n  auto: {{type: route, router: {out}, experts: [{', '.join(names)}]}}\n"
    )
    c = (
        load_spec(spec)
        .system("auto")
        .generate(
            GenerationRequest(
                prompt="python the function with loop number 7", max_tokens=2
            )
        )
    )
    assert c.trace["routed_to"] == "coder" and set(c.trace["scores"]) == set(names)

    # in place (no --out): atomic, same weights, a second name is refused
    demos2 = _write(
        tmp_path / "demos2.jsonl",
        [
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "scores": {
                    "coder2": r["scores"]["coder"],
                    "mathy": r["scores"]["mathy"],
                },
            }
            for r in demo_rows
        ],
    )
    r = runner.invoke(
        app,
        [
            "route",
            "add-expert",
            "--router",
            str(out),
            "--expert",
            "coder2",
            "--demos",
            str(demos2),
            "--pseudo-labels",
            "30",
        ],
    )
    assert r.exit_code == 0 and "and 30 pseudo-labelled queries" in r.output, r.output
    assert sha256_file(out / "router.safetensors") == weights
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["experts"][-1] == "coder2" and cfg["meta"]["train_mean_costs"][-1] == 1.0
    )  # no cost given: 1
    back = Router.load(out)
    assert (
        isinstance(back, PopulationRouter)
        and len(back.ctx_y[-1]) == 50
        and back.ctx_info[-1]["pseudo_labels"] == 30
    )


def test_cli_add_expert_errors(
    trained_dir: tuple[Path, list[dict[str, Any]]], tmp_path: Path, synth_path: Path
) -> None:
    src, _ = trained_dir
    weights = sha256_file(src / "router.safetensors")
    good = {"id": "d1", "prompt": "python the loop", "scores": {"coder": 1.0}}

    def add(
        demo_rows: list[dict[str, Any]],
        expert: str = "coder",
        router: Path = src,
        *extra: str,
    ) -> Any:
        demos = _write(tmp_path / "d.jsonl", demo_rows)
        return runner.invoke(
            app,
            [
                "route",
                "add-expert",
                "--router",
                str(router),
                "--expert",
                expert,
                "--demos",
                str(demos),
                *extra,
            ],
        )

    r = add([good, {**good, "id": "d2", "answer": "x"}])
    assert r.exit_code != 0 and "line 2: unknown field 'answer'" in str(r.exception)
    r = add([good, {"id": "d2", "prompt": "x", "scores": {"mathy": 1.0}}])
    assert (
        r.exit_code != 0
        and "line 2: scores: no score for expert 'coder' (the row scores: mathy)"
        in str(r.exception)
    )
    r = add([{**good, "scores": {"coder": 1.5}}])
    assert (
        r.exit_code != 0
        and "line 1: scores.coder: expected a number in [0, 1], found 1.5"
        in str(r.exception)
    )
    r = add([good, good])
    assert r.exit_code != 0 and "line 2: duplicate id 'd1'" in str(r.exception)
    r = add([{**good, "scores": {"mathy": 1.0}}], "mathy")
    assert r.exit_code != 0 and "already has an expert 'mathy'" in str(r.exception)
    knn = tmp_path / "knn"
    assert (
        runner.invoke(
            app,
            [
                "route",
                "train",
                "--data",
                str(synth_path),
                "--router",
                "knn",
                "-o",
                "encoder=tfidf",
                "--out",
                str(knn),
            ],
        ).exit_code
        == 0
    )
    r = add([good], "coder", knn)
    assert (
        r.exit_code != 0
        and "a 'knn' router cannot take new experts without retraining"
        in str(r.exception)
    )
    r = add([good], "coder", src, "--out", str(knn))
    assert r.exit_code != 0 and "already exists" in str(r.exception)
    assert (
        sha256_file(src / "router.safetensors") == weights
        and json.loads((src / "config.json").read_text())["experts"] == KNOWN
    )
