from __future__ import annotations

import json
from pathlib import Path

import pytest

from collab import skills
from collab.zoo_build import DomainExpertConfig, build_domain_expert


def test_skill_generators_are_seeded_and_disjoint() -> None:
    for skill in skills.SKILLS:
        a = skills.generate(skill, 50, seed=1)
        assert a == skills.generate(skill, 50, seed=1)
        assert len({e.question for e in a}) == 50
        test = skills.test_set(skill, 40, train_size=500)
        train = {e.question for e in skills.generate(skill, 500, skills.TRAIN_SEED)}
        assert not train & {e.question for e in test}


@pytest.mark.parametrize(
    "skill, output, answer, score",
    [
        ("arith", "The answer is 1083.", "1083", 1.0),
        ("arith", "1,083", "1083", 0.0),
        ("arith", "It is 1082, not 1083", "1083", 0.0),
        ("arith", "-12", "-12", 1.0),
        ("lists", "1, 2, 5, 9", "1, 2, 5, 9", 1.0),
        ("lists", "Sorted: 1, 2, 5, 9.", "1, 2, 5, 9", 1.0),
        ("lists", "1, 2, 9, 5", "1, 2, 5, 9", 0.0),
        ("lists", "1, 2, 5", "1, 2, 5, 9", 0.0),
        ("units", "3000 m", "3000", 1.0),
        ("units", "3 km is 3000 m", "3000", 0.0),
    ],
)
def test_checker(skill: str, output: str, answer: str, score: float) -> None:
    assert skills.check(skill, output, answer) == score


def test_dev_set_is_disjoint_from_train_and_test() -> None:
    for skill in skills.SKILLS:
        dev = {e.question for e in skills.dev_set(skill, 30, train_size=500, test_size=40)}
        assert len(dev) == 30
        assert not dev & {e.question for e in skills.generate(skill, 500, skills.TRAIN_SEED)}
        assert not dev & {e.question for e in skills.test_set(skill, 40, train_size=500)}


def test_mixed_set_interleaves_all_skills() -> None:
    mixed = skills.mixed_test_set(5)
    assert len(mixed) == 5 * len(skills.SKILLS)
    assert [e.skill for e in mixed[: len(skills.SKILLS)]] == list(skills.SKILLS)


def test_build_resumes_to_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = DomainExpertConfig(skill="arith", base=str(tiny_model_dir), steps=4, batch_size=4, train_examples=64, warmup_steps=1, checkpoint_every=2, save_dtype="float32")
    straight = build_domain_expert("tiny-arith", cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        build_domain_expert("tiny-arith", cfg, tmp_path / "b", stop_after=3)
    assert (tmp_path / "b" / ".tiny-arith.checkpoint" / "state.json").exists()
    assert not (tmp_path / "b" / "tiny-arith").exists()  # nothing partial in place
    resumed = build_domain_expert("tiny-arith", cfg, tmp_path / "b")
    assert not (tmp_path / "b" / ".tiny-arith.checkpoint").exists()
    wa = load_file(str(straight / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-5, k
    info = json.loads((resumed / "collab_train.json").read_text())
    assert len(info["losses"]) == 4
    assert info["config"]["skill"] == "arith" and len(info["train_data_sha256"]) == 64
    assert json.loads((resumed / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)


def test_trained_adapter_loads_as_expert_and_differs_from_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from collab.experts import Expert

    cfg = DomainExpertConfig(skill="units", base=str(tiny_model_dir), steps=6, batch_size=4, train_examples=32, warmup_steps=1, learning_rate=1e-2)
    path = build_domain_expert("tiny-units", cfg, tmp_path)
    tuned, base = Expert.load(path), Expert.load(tiny_model_dir)
    assert tuned.name == "tiny-units"
    ids = torch.tensor([base.tokenizer("Convert 3 km to m.").input_ids])
    assert not torch.allclose(tuned.forward(ids).logits, base.forward(ids).logits)
    losses = json.loads((path / "collab_train.json").read_text())["losses"]
    assert losses[-1] < losses[0]
