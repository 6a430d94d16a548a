"""collab's merge engine: the tensor reader and streaming writer, the tensor
plan (mergekit's parameter rules, architecture definitions, order), kernels
against mergekit's, and configs beyond the parity table against
`mergekit-yaml` bit for bit (dtypes, gradients and filters, slices, a base
outside `models:`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from merging import MergeError, merge
from tests.merging.conftest import load_weights
from tests.merging.test_parity import assert_bit_identical, run_mergekit_cli


def _m(path: Path, **params: Any) -> dict[str, Any]:
    return {"model": str(path), **({"parameters": params} if params else {})}


def _ties_cfg(m: dict[str, Path], **extra: Any) -> dict[str, Any]:
    models = [_m(m["base"])] + [_m(m[f"ft{i}"], weight=w, density=d) for i, w, d in ((1, 0.5, 0.3), (2, 0.3, 0.6), (3, 0.2, 1.0))]
    return {"models": models, "base_model": str(m["base"]), "merge_method": "ties_fast", "dtype": "float32", **extra}


# ------------------------------------------------------------------ tensor I/O


def test_reader_and_streaming_writer_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from merging.tensorio import ModelReader, StreamingShardWriter

    g = torch.Generator().manual_seed(0)
    sd = {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(4, 4, generator=g).to(torch.float16),
    }
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    r = ModelReader(src)
    assert sorted(r.names()) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(r.get(k), v) and r.get(k).dtype == v.dtype and r.shape(k) == tuple(v.shape)
    # Two shards of at most 40 parameters each, written out of order; dtypes are
    # not declared up front ("a" is written as float64).
    out = tmp_path / "out"
    out.mkdir()
    w = StreamingShardWriter(out, [(k, tuple(v.shape)) for k, v in sd.items()], shard_size=40)
    for k in ("d", "b", "a", "c"):
        w.write(k, r.get(k).double() if k == "a" else r.get(k))
    w.close()
    r.close()
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (out / "model.safetensors.index.json").exists()
    back: dict[str, torch.Tensor] = {}
    for f in files:
        back.update(load_file(str(out / f)))
        with safe_open(str(out / f), framework="pt") as fh:  # the Rust reader checks offsets and the padded header
            assert fh.metadata() == {"format": "pt"}
    assert sorted(back) == sorted(sd)
    assert back["a"].dtype == torch.float64 and torch.equal(back["a"], sd["a"].double())
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in "bcd")


def test_writer_refuses_missing_unplanned_and_misshapen_tensors(tmp_path: Path) -> None:
    from merging.tensorio import StreamingShardWriter

    w = StreamingShardWriter(tmp_path, [("a", (2,)), ("b", (2,))], shard_size=100)
    w.write("a", torch.zeros(2))
    with pytest.raises(MergeError, match="tensor 'a' was not planned .* or was already written"):
        w.write("a", torch.zeros(2))
    with pytest.raises(MergeError, match=r"tensor 'b': computed shape \[3\] but the plan has \[2\]"):
        w.write("b", torch.zeros(3))
    with pytest.raises(MergeError, match="1 tensors were not written"):
        w.close()
    w.abort()


# ------------------------------------------------------------------ parameters


SETTINGS = [
    0.3,
    "0.25",
    [0.0, 0.5, 1.0],
    [1, 3],
    [True, False, True],
    ["a", "b"],
    {"filter": "mlp", "value": [0.2, 0.9]},
    [{"filter": "self_attn", "value": 0.1}, {"filter": "*", "value": 0.7}],
    [{"filter": "nothing-matches", "value": 0.1}],
    [],
]


@pytest.mark.parametrize("value", SETTINGS, ids=[repr(s) for s in SETTINGS])
def test_settings_evaluate_as_mergekit_does(value: Any) -> None:
    """collab's typed settings give mergekit's value for every tensor and layer
    position (``mergekit.config.evaluate_setting``), for float, int, bool and
    str parameters."""
    from mergekit.config import ConditionalParameter, evaluate_setting
    from pydantic import TypeAdapter

    from merging.settings import parse, to_yaml

    setting = parse(value, "p")
    assert parse(to_yaml(setting), "p") == setting
    theirs = value
    if isinstance(value, dict):
        theirs = ConditionalParameter(**value)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        theirs = [ConditionalParameter(**v) for v in value]
    from merging.settings import evaluate

    for kind in (float, int, bool, str):
        validate = TypeAdapter(kind).validate_python
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
            for t in (0.0, 0.3, 0.5, 1.0):
                try:
                    expect: Any = evaluate_setting(name, theirs, t, validate=validate)
                except Exception as e:  # noqa: BLE001 - a value the type rejects: both must reject it
                    with pytest.raises(type(e)):
                        evaluate(setting, name, t, validate)
                    continue
                assert evaluate(setting, name, t, validate) == expect, (kind, name, t)


def test_allowed_keys_are_mergekits_fields() -> None:
    from mergekit.config import MergeConfiguration

    from merging.config import _MERGEKIT_KEYS

    assert _MERGEKIT_KEYS == tuple(MergeConfiguration.model_fields)


def test_plan_round_trips_through_yaml(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """The typed plan writes back the config it was read from (the search
    writes its chosen weights this way)."""
    from merging.config import plan_merge
    from merging.inputs import InputResolver

    cfg = {
        "slices": [{"sources": [_m(merge_models["ft1"], weight=[0.1, 0.9]), {**_m(merge_models["ft2"]), "layer_range": [0, 2]}]}],
        "merge_method": "linear",
        "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}], "normalize": True},
        "dtype": "torch.bfloat16",
    }
    cfg["slices"][0]["sources"][0]["layer_range"] = [0, 2]

    def resolver(_p: Path | None) -> InputResolver:
        return InputResolver(tmp_path, search_dirs=[tmp_path])

    plan = plan_merge(cfg, resolver)
    assert plan.dtype == "bfloat16"
    back = plan.to_config()
    assert back["slices"] == cfg["slices"] and back["parameters"] == cfg["parameters"] and back["dtype"] == "bfloat16"
    assert plan_merge(back, resolver).to_config() == back


# ------------------------------------------------------------------ kernels


def test_zero_task_vectors_change_nothing() -> None:
    from merging.fast_ties import ties_merge

    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 32, generator=g)
    ft = base + 0.01 * torch.randn(64, 32, generator=g)
    one = ties_merge(base, [ft], [1.0], [0.5])
    with_zero = ties_merge(base, [ft, base.clone()], [1.0, 1.0], [0.5, 0.5])
    assert torch.equal(one, with_zero)
    assert torch.equal(ties_merge(base, [base.clone(), base.clone()], [1.0, 1.0], [0.5, 0.5]), base)


@pytest.mark.parametrize("shape", [(100,), (7, 3, 5), (64, 32)])
@pytest.mark.parametrize("n", [1, 3, 5, 6])
def test_task_arithmetic_kernel_equals_mergekits_group_merge(shape: tuple[int, ...], n: int) -> None:
    """Bit for bit, also where torch's stacked sum over more than four rows rounds
    differently from adding them in order (sizes that are not a multiple of 32)."""
    from mergekit.merge_methods.base import TensorGroup as MergekitGroup
    from mergekit.merge_methods.registry import get as mergekit_method

    from merging.methods import TensorGroup
    from merging.registry import get_method

    g = torch.Generator().manual_seed(n)
    base = torch.randn(shape, generator=g)
    tensors = [base + torch.randn(shape, generator=g) for _ in range(n)]
    weights = [float(w) for w in torch.rand(n, generator=g) * 2 - 0.5]
    refs = ("base",) + tuple(f"m{i}" for i in range(n))
    for normalize, lam in ((False, 1.0), (True, 0.7)):
        group = MergekitGroup.from_tensors([base] + tensors, base_index=0)
        params = {"weight": {i + 1: w for i, w in enumerate(weights)}, "normalize": normalize, "lambda": lam}
        params |= {"density": {i + 1: 1.0 for i in range(n)}, "rescale": False, "int8_mask": False}
        theirs = mergekit_method("task_arithmetic").merge_group(group, **params)
        ours = get_method("task_arithmetic").kernel(
            TensorGroup("t", refs, tuple(t.clone() for t in [base] + tensors), 0),
            {"weight": dict(zip(refs[1:], weights)), "normalize": normalize, "lambda": lam},
        )
        assert torch.equal(ours, theirs)


def test_every_mergekit_method_runs_mergekits_kernel_except_task_arithmetic() -> None:
    from merging.mergekit_methods import MergekitKernel
    from merging.registry import mergekit_methods

    kernels = {name: m.kernel for name, m in mergekit_methods().items()}
    assert len(kernels) == 20
    assert all(isinstance(k, MergekitKernel) and k.name == name for name, k in kernels.items() if name != "task_arithmetic")


def test_ties_fast_on_the_engine_equals_ties_fast_through_run_merge(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """The engine's ``ties_fast`` kernel and the mergekit ``MergeMethod`` collab
    registers for configs only ``run_merge`` runs give the same bits."""
    import merging.mergekit_run
    from merging.config import plan_merge
    from merging.inputs import InputResolver
    from merging.runner import Progress

    cfg = _ties_cfg(merge_models, parameters={"rescale": True, "lambda": 0.8, "normalize": False})
    merge(cfg, tmp_path / "engine", quiet=True)
    plan = plan_merge(cfg, lambda _p: InputResolver(tmp_path, search_dirs=[tmp_path]))
    (tmp_path / "mergekit").mkdir()
    merging.mergekit_run.run(plan, tmp_path / "mergekit", seed=None, progress=Progress(None), workdir=tmp_path, shard_size=10**9)
    assert_bit_identical(load_weights(tmp_path / "engine"), load_weights(tmp_path / "mergekit"))


# ------------------------------------------------------------------ against mergekit-yaml


def _half_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    save_file({k: v.to(dtype) for k, v in load_weights(src).items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _engine_configs(m: dict[str, Path], tmp: Path) -> dict[str, dict[str, Any]]:
    fts = [m["ft1"], m["ft2"], m["ft3"]]
    five = fts + [m["other1"], m["other2"]]
    bf = [_half_copy(p, tmp / f"bf16-{p.name}", torch.bfloat16) for p in (m["base"], m["ft1"])]
    return {
        "linear-unnormalised-bf16": {
            "merge_method": "linear", "models": [_m(p, weight=w) for p, w in zip(fts, [0.7, 0.6, -0.1])],
            "parameters": {"normalize": False}, "dtype": "bfloat16",
        },
        "task_arithmetic-five-normalised": {
            "merge_method": "task_arithmetic", "base_model": str(m["base"]),
            "models": [_m(p, weight=w) for p, w in zip(five, [0.6, 0.4, 0.9, 0.2, 0.3])], "parameters": {"normalize": True},
        },
        "linear-with-a-base-outside-models": {  # mergekit appends the base as an input
            "merge_method": "linear", "base_model": str(m["base"]), "models": [_m(p, weight=0.4) for p in fts[:2]],
            "parameters": {"weight": 0.2},
        },
        "dare_ties-gradients-and-filters": {
            "merge_method": "dare_ties", "base_model": str(m["base"]),
            "models": [_m(fts[0], weight=[0.2, 0.8], density=[{"filter": "mlp", "value": 0.3}, {"value": 0.9}]), _m(fts[1], weight=0.5)],
            "parameters": {"density": 0.6, "lambda": [{"filter": "self_attn", "value": 1.5}, {"value": 1.0}]},
        },
        "dare_linear-slices": {
            "merge_method": "dare_linear",
            "slices": [
                {"sources": [{**_m(m["base"]), "layer_range": [0, 1]}, {**_m(fts[0], weight=0.7, density=0.5), "layer_range": [1, 2]}],
                 "base_model": str(m["base"])},
                {"sources": [{**_m(m["base"]), "layer_range": [0, 2]}, {**_m(fts[1], weight=0.4, density=0.3), "layer_range": [0, 2]}],
                 "base_model": str(m["base"]), "parameters": {"lambda": 0.5}},
            ],
        },
        "arcee_fusion-bf16-inputs-float32-result": {  # the kernel returns float32 for half inputs
            "merge_method": "arcee_fusion", "base_model": str(bf[0]), "models": [_m(bf[0]), _m(bf[1])],
        },
        "slerp-out_dtype-float16-torch-prefix": {
            "merge_method": "slerp", "base_model": str(m["base"]), "models": [_m(m["base"]), _m(fts[0])],
            "parameters": {"t": 0.3}, "dtype": "torch.float32", "out_dtype": "float16",
        },
        "karcher-float64": {"merge_method": "karcher", "models": [_m(p) for p in fts], "dtype": "float64"},
    }


ENGINE_CONFIGS = [
    "linear-unnormalised-bf16", "task_arithmetic-five-normalised", "linear-with-a-base-outside-models",
    "dare_ties-gradients-and-filters", "dare_linear-slices", "arcee_fusion-bf16-inputs-float32-result",
    "slerp-out_dtype-float16-torch-prefix", "karcher-float64",
]


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_engine_equals_mergekit_cli_bit_for_bit(name: str, merge_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import merging.mergekit_run

    cfg = _engine_configs(merge_models, tmp_path)[name]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_mergekit_cli(path, tmp_path / "mergekit", seed=7)
    monkeypatch.setattr(merging.mergekit_run, "run", lambda *a, **k: pytest.fail("ran through mergekit's run_merge"))
    merge(path, tmp_path / "collab", quiet=True, seed=7)
    assert_bit_identical(load_weights(tmp_path / "collab"), load_weights(tmp_path / "mergekit"))
    ours = {p.name for p in (tmp_path / "collab").iterdir()} - {"README.md", "merge_config.yaml"}
    assert ours == {p.name for p in (tmp_path / "mergekit").iterdir()}
    if "slices" in cfg:
        import json

        n_layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"])
        assert json.loads((tmp_path / "collab" / "config.json").read_text())["num_hidden_layers"] == n_layers


def test_tensors_run_in_mergekits_order(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """Sorted by input tensor name, as mergekit's executor schedules them:
    randomised methods draw their masks in this order."""
    from merging.config import plan_merge
    from merging.inputs import InputResolver
    from merging.layout import layout
    from merging.tensorio import ModelReader

    cfg = _engine_configs(merge_models, tmp_path)["dare_linear-slices"]
    plan = plan_merge(cfg, lambda _p: InputResolver(tmp_path, search_dirs=[tmp_path]))
    readers = {r: ModelReader(plan.inputs[r].path) for r in plan.model_refs}
    jobs = layout(plan, readers).jobs
    labels = [j.label for j in jobs]
    assert labels == sorted(labels) and len(jobs) == 1 + 3 * 9 + 2  # embeddings, three layers, norm and lm_head
    # output layer 2 comes from the base's layer 1 and ft2's layer 1
    job = next(j for j in jobs if j.name == "model.layers.2.mlp.up_proj.weight")
    assert [n for _, n in job.inputs] == ["model.layers.1.mlp.up_proj.weight"] * 2
    assert job.params["lambda"] == 0.5 and job.params["weight"] == {str(merge_models["ft2"]): 0.4}


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda c: c.update(tokenizer_source="union"), "tokenizer rules"),
        (lambda c: c.update(chat_template="chatml"), "chat_template"),
    ],
)
def test_configs_beyond_the_engine_run_through_run_merge(
    edit: Any, reason: str, merge_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import merging.engine
    import merging.mergekit_run
    from merging.config import plan_merge
    from merging.inputs import InputResolver
    from merging.layout import unsupported

    cfg = _ties_cfg(merge_models)
    edit(cfg)
    plan = plan_merge(cfg, lambda _p: InputResolver(tmp_path, search_dirs=[tmp_path]))
    assert reason in (unsupported(plan) or "")
    calls = []
    original = merging.mergekit_run.run
    monkeypatch.setattr(merging.mergekit_run, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(merging.engine, "run", lambda *a, **k: pytest.fail("the engine ran a config it does not lay out"))
    merge(cfg, tmp_path / "out", quiet=True)
    assert calls == [1] and (tmp_path / "out" / "model.safetensors").exists()


def test_missing_parameter_for_the_appended_base_fails_before_writing(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """mergekit's ``linear`` weighs a ``base_model`` that ``models:`` does not
    list; without a weight for it the dry run already fails, naming it."""
    cfg = {"merge_method": "linear", "base_model": str(merge_models["base"]), "models": [_m(merge_models["ft1"], weight=1.0)]}
    with pytest.raises(MergeError, match=rf"parameter 'weight' of method 'linear' is not set for model '{merge_models['base']}'"):
        merge(cfg, None, dry_run=True, quiet=True)


@pytest.mark.parametrize("method", ["ties_fast", "task_arithmetic", "dare_ties"])
def test_in_memory_merge_equals_the_written_merge_and_leaves_inputs_alone(method: str, merge_models: dict[str, Path], tmp_path: Path) -> None:
    """The search's in-memory merges run the same plan and kernels as the merge
    written to disk, and the kernels that work in place get copies."""
    from merging.config import plan_merge
    from merging.engine import merge_state_dicts
    from merging.inputs import InputResolver

    cfg = {**_ties_cfg(merge_models), "merge_method": method}
    merge(cfg, tmp_path / "disk", quiet=True, seed=3)
    plan = plan_merge(cfg, lambda _p: InputResolver(tmp_path, search_dirs=[tmp_path]))
    states = {r: load_weights(plan.inputs[r].path) for r in plan.model_refs}
    before = {r: {k: v.clone() for k, v in sd.items()} for r, sd in states.items()}
    torch.manual_seed(3)
    merged = merge_state_dicts(plan, states)
    assert_bit_identical(merged, load_weights(tmp_path / "disk"))
    for r, sd in states.items():
        assert all(torch.equal(v, before[r][k]) for k, v in sd.items()), f"{method} modified the inputs of {r}"
