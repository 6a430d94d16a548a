"""Output format, dry runs, atomic writes and clear errors of `collab merge`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from merging import MergeError, merge
from tests.merging.conftest import load_weights


def _write(tmp_path: Path, cfg: dict[str, Any], name: str = "merge.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _linear(m: dict[str, Path]) -> dict[str, Any]:
    return {"models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(m["ft2"]), "parameters": {"weight": 0.5}}],
            "merge_method": "linear", "dtype": "float32"}


def test_output_loads_as_expert_and_generates(merge_models: dict[str, Path], tmp_path: Path) -> None:
    from collab.experts import Expert
    from collab.system import GenerationRequest

    # relative paths, resolved against the config's directory (mergekit would ask the Hub about them)
    os.symlink(merge_models["ft1"], tmp_path / "a")
    os.symlink(merge_models["ft2"], tmp_path / "b")
    cfg = {"models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 3.0}}], "merge_method": "linear"}
    res = merge(_write(tmp_path, cfg), tmp_path / "out", quiet=True, shard_size=20_000)
    out = tmp_path / "out"
    assert res.out_dir == out and res.tensors == 21
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    card = (out / "README.md").read_text()
    assert "`a`" in card and "`b`" in card and "Linear" in card and "weight" in card
    w, a, b = load_weights(out), load_weights(merge_models["ft1"]), load_weights(merge_models["ft2"])
    k = "model.layers.0.mlp.up_proj.weight"
    assert float((w[k] - (0.25 * a[k] + 0.75 * b[k])).abs().max()) < 1e-6
    expert = Expert.load(out)
    c = expert.generate(GenerationRequest(messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=5))
    assert c.usage.completion_tokens > 0


def test_dry_run_writes_nothing(merge_models: dict[str, Path], tmp_path: Path) -> None:
    before = set(tmp_path.iterdir())
    res = merge(_linear(merge_models), tmp_path / "out", dry_run=True, quiet=True)
    assert res.dry_run and res.out_dir is None and len(res.inputs) == 2
    assert set(tmp_path.iterdir()) == before


def test_interrupted_merge_leaves_no_output(merge_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from merging import runner

    calls = {"n": 0}
    original = runner.Progress.start

    def start(self: Any, description: str, total: int | None) -> Any:
        def advance(n: int = 1) -> None:
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt

        original(self, description, total)
        return advance

    monkeypatch.setattr(runner.Progress, "start", start)
    with pytest.raises(KeyboardInterrupt):
        merge(_linear(merge_models), tmp_path / "out", quiet=True)
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []  # neither out nor a partial temp dir


def test_existing_output_is_kept_unless_overwrite(merge_models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="already exists"):
        merge(_linear(merge_models), tmp_path / "out", quiet=True)
    merge(_linear(merge_models), tmp_path / "out", quiet=True, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c, m: c.update(merge_method="linaer"), "unknown method 'linaer'"),
        (lambda c, m: c["models"][0]["parameters"].update(wieght=1), "unknown parameter 'wieght' for method 'linear'"),
        (lambda c, m: c.update(merge_method="ties"), "needs a base model"),
        (lambda c, m: c["models"][1].pop("parameters"), r"models\[1\] .*'weight' is required"),
        (lambda c, m: c["models"][1].update(model=str(m["base"]) + "-missing"), "not found"),
        (lambda c, m: c["models"][1].update(model="org/some-hub-model"), "Hub ids are not downloaded"),
        (lambda c, m: c["models"][0]["parameters"].update(weight="abc"), r"models\[0\]\.parameters\.weight: expected float, found 'abc'"),
        (lambda c, m: c["models"][0].update(paramters={}), r"models\[0\]: unknown key 'paramters'; expected one of model, parameters"),
        (
            lambda c, m: c.update(merge_method="slerp", base_model=str(m["ft1"]), parameters={"t": 0.5},
                                  models=[{"model": str(m[k])} for k in ("ft1", "ft2", "ft3")]),
            "method 'slerp' takes at most 2 models, found 3",
        ),
    ],
)
def test_bad_config_errors(merge_models: dict[str, Path], tmp_path: Path, edit: Any, message: str) -> None:
    cfg = _linear(merge_models)
    edit(cfg, merge_models)
    with pytest.raises(MergeError, match=message):
        merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_model_tensor_and_shapes(merge_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.tiny import make_tiny_model

    wide = make_tiny_model(tmp_path / "wide", seed=3, intermediate=96)
    cfg = _linear(merge_models)
    cfg["models"][1]["model"] = str(wide)
    with pytest.raises(MergeError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[32, 96\] in '.*wide' but \[32, 64\]"):
        merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_needs_tokenizer_rule(merge_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.merging.conftest import perturb

    other = perturb(merge_models["ft1"], tmp_path / "retok", seed=5)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = _linear(merge_models)
    cfg["models"][1]["model"] = str(other)
    with pytest.raises(MergeError, match="tokenizers of .* differ"):
        merge(cfg, None, dry_run=True, quiet=True)


def test_pickle_only_with_allow_pickle(merge_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import torch

    pk = tmp_path / "pickled"
    shutil.copytree(merge_models["ft2"], pk)
    torch.save(load_weights(pk), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    cfg = _linear(merge_models)
    cfg["models"][1]["model"] = str(pk)
    with pytest.raises(MergeError, match="pickled weights only.*--allow-pickle"):
        merge(cfg, tmp_path / "out", quiet=True)
    merge(cfg, tmp_path / "out", quiet=True, allow_pickle=True)
    ref = tmp_path / "ref"
    merge(_linear(merge_models), ref, quiet=True)
    w, r = load_weights(tmp_path / "out"), load_weights(ref)
    assert all(torch.equal(w[k], r[k]) for k in r)


def test_lora_adapter_input_is_merged_into_its_base(merge_models: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merge_models["base"]))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    merged_ref = peft_model.merge_and_unload().state_dict()
    cfg = {"models": [{"model": str(adapter), "parameters": {"weight": 1.0}}], "merge_method": "linear", "dtype": "float32"}
    merge(cfg, tmp_path / "out", quiet=True)
    w = load_weights(tmp_path / "out")
    k = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(w[k], load_weights(merge_models["base"])[k])
    assert float((w[k] - merged_ref[k]).abs().max()) < 1e-6


def test_cli_merge_and_dry_run(merge_models: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write(tmp_path, _linear(merge_models))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    dry = subprocess.run([sys.executable, "-m", "collab.cli", "merge", str(cfg), str(tmp_path / "o"), "--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "is valid" in dry.stdout and not (tmp_path / "o").exists()
    bad = _write(tmp_path, {**_linear(merge_models), "merge_method": "nope"}, "bad.yaml")
    err = subprocess.run([sys.executable, "-m", "collab.cli", "merge", str(bad), str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert err.returncode == 2 and "unknown method 'nope'" in err.stderr


def test_merged_model_serves_through_a_spec(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """`collab merge` from the CLI, then the output served as `type: expert` in a spec:
    `collab generate SPEC -s merged` answers with the merged weights (greedy output
    equal to the merged model loaded directly)."""
    from collab.experts import Expert
    from collab.spec import load_spec
    from collab.system import GenerationRequest

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cfg = _write(tmp_path, _linear(merge_models))
    done = subprocess.run([sys.executable, "-m", "collab.cli", "merge", str(cfg), str(tmp_path / "merged"), "--quiet"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("systems:\n  merged: {type: expert, ref: merged}\n")
    system = load_spec(spec_path).system("merged")
    req = GenerationRequest(messages=[{"role": "user", "content": "hello there"}], max_tokens=6)
    served = system.generate(req)
    direct = Expert.load(tmp_path / "merged").generate(req)
    assert served.text == direct.text and served.usage.completion_tokens > 0
    assert served.trace["type"] == "expert"
    cli = subprocess.run(
        [sys.executable, "-m", "collab.cli", "generate", str(spec_path), "hello there", "-s", "merged", "--max-tokens", "6"],
        capture_output=True, text=True, env=env,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == direct.text.strip()


def _adapter(base: Path, out: Path, base_ref: str) -> Path:
    """A LoRA adapter of ``base`` whose adapter_config names its base as ``base_ref``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_ref
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_model_card_cites_references_as_written(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """The card names each input as the config wrote it, never the directories it
    resolved to on this machine (LoRA merges live in a work directory that is
    deleted after the merge)."""
    from collab.io import cache_root

    os.symlink(merge_models["base"], tmp_path / "base")
    os.symlink(merge_models["ft1"], tmp_path / "ft1")
    _adapter(tmp_path / "base", tmp_path / "adapter", "../base")
    models = [{"model": ref, "parameters": {"weight": 1.0}} for ref in ("ft1", "adapter", "base+adapter")]
    merge(_write(tmp_path, {"models": models, "merge_method": "linear", "dtype": "float32"}), tmp_path / "out", quiet=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `ft1` | hf |" in card
    assert "| `adapter` | lora | LoRA adapter merged into its base '../base' |" in card
    assert "| `base+adapter` | lora | LoRA adapter 'adapter' merged into 'base' |" in card
    for machine_path in (str(tmp_path), str(Path(tmp_path).resolve()), str(cache_root()), "merge-work", str(merge_models["base"])):
        assert machine_path not in card, machine_path


def test_quiet_merge_draws_no_progress_bars(merge_models: dict[str, Path], tmp_path: Path) -> None:
    """`collab merge -q` of a LoRA input (merged into its base by transformers,
    which draws its own bars) prints no bar; without -q the bars are there."""
    _adapter(merge_models["base"], tmp_path / "adapter", str(merge_models["base"]))
    cfg = {"models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}},
                      {"model": str(merge_models["ft1"]), "parameters": {"weight": 1.0}}], "merge_method": "linear", "dtype": "float32"}
    path = _write(tmp_path, cfg)
    # set by earlier quiet merges in this process (collab.io.silence_library_progress)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    env["HF_HUB_OFFLINE"] = "1"
    bars = ("Loading weights", "Writing model shards", "merging tensors", "it/s", "\u2501")
    cli = [sys.executable, "-m", "collab.cli", "merge", str(path)]
    loud = subprocess.run([*cli, str(tmp_path / "loud")], check=False, capture_output=True, text=True, env=env)
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr and "merging tensors" in loud.stderr  # the bars -q must hide
    quiet = subprocess.run([*cli, str(tmp_path / "quiet"), "-q"], check=False, capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert [b for b in bars if b in quiet.stderr] == [], quiet.stderr
    assert "wrote" in quiet.stdout
