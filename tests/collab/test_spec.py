from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from collab.errors import SpecError
from collab.spec import load_spec


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_experts_and_expert_systems(tmp_path: Path, tiny_model_dir: Path) -> None:
    p = write(
        tmp_path,
        f"""
experts:
  tiny: {{ref: {tiny_model_dir}}}
systems:
  again: {{type: expert, ref: {tiny_model_dir}}}
""",
    )
    spec = load_spec(p)
    assert spec.names() == ["tiny", "again"]
    a, b = spec.system("tiny"), spec.system("again")
    assert a.name == "tiny" and b.name == "again"
    assert spec.system("tiny") is a  # built once
    from collab.system import GenerationRequest

    req = GenerationRequest.chat("hi", max_tokens=4)
    assert a.generate(req).text == b.generate(req).text


def test_relative_paths_resolve_against_spec_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "m")
    spec = load_spec(write(tmp_path, "experts:\n  m: {ref: models/m}\n"))
    assert spec.experts["m"].ref == str(tmp_path / "models" / "m")


@pytest.mark.parametrize(
    "text, match",
    [
        ("experts: [1, 2]", r"spec.yaml: experts: expected a mapping"),
        ("experts:\n  a: {ref: zoo:nope}", r"experts.a.ref: unknown zoo name 'zoo:nope'"),
        ("experts:\n  a: {ref: ./missing}", r"experts.a.ref: './missing' not found"),
        ("experts:\n  a: {url: http://x/v1}", r"experts.a.model: missing"),
        ("experts:\n  a: {url: ftp://x, model: m}", r"experts.a.url: expected an http"),
        ("experts:\n  a: {ref: zoo:gemma3-270m, url: http://x}", r"experts.a: expected exactly one of 'ref'"),
        ("experts:\n  a: {ref: zoo:gemma3-270m, colour: red}", r"experts.a.colour: unknown key"),
        ("systems:\n  s: {router: x}", r"systems.s.type: missing"),
        ("systems:\n  s: {type: teleport}", r"systems.s.type: unknown system type 'teleport'"),
        ("systems:\n  s: {type: expert}", r"systems.s.ref: missing"),
        ("systems:\n  s: {type: expert, ref: gone/}", r"systems.s.ref: 'gone/' not found"),
        ("experts:\n  a: {ref: zoo:gemma3-270m, dtype: float8}", r"spec.yaml: experts.a.dtype: expected one of auto, float32, bfloat16, float16, found 'float8'"),
        ("experts:\n  a: {ref: zoo:gemma3-270m, prompt_format: chatml}", r"experts.a.prompt_format: expected one of chat_template, plain"),
        ("experts:\n  a: {ref: zoo:gemma3-270m, batch_size: 0}", r"experts.a.batch_size: expected an integer >= 1, found 0"),
        ("experts:\n  a: {ref: zoo:gemma3-270m, allow_pickle: 'yes'}", r"experts.a.allow_pickle: expected true or false"),
        ("systems:\n  s: {type: expert, ref: zoo:gemma3-270m, dtype: half}", r"systems.s.dtype: expected one of auto"),
        ("experts:\n  a: {url: 'http://x/v1', model: m, retries: -1}", r"experts.a.retries: expected a number >= 0, found -1"),
        ("flavour: 1", r"flavour: unknown top-level key"),
        ("{}", r"defines no experts and no systems"),
        ("experts: {a: [unclosed", r"not valid YAML at line 1"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        load_spec(write(tmp_path, text))


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_system_and_expert_name_clash(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="already an expert"):
        load_spec(write(tmp_path, "experts:\n  a: {ref: zoo:gemma3-270m}\nsystems:\n  a: {type: expert, ref: zoo:gemma3-270m}\n"))


def test_unknown_system_name(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "experts:\n  a: {ref: zoo:gemma3-270m}\n"))
    with pytest.raises(SpecError, match="unknown system 'b'; defined: a"):
        spec.system("b")


def test_runtime_registered_system_type(tmp_path: Path, tiny_model_dir: Path) -> None:
    from collab.spec import _REGISTRY, register_system_type

    class Echo:
        def validate(self, spec: Any, name: str, config: dict[str, Any]) -> None:
            spec.require_experts(config, "experts", f"systems.{name}")

        def build(self, spec: Any, name: str, config: dict[str, Any]) -> Any:
            inner = spec.system(config["experts"][0])
            inner_name = inner.name
            return type("EchoSystem", (), {"name": name, "inner": inner_name})()

    register_system_type("echo", Echo())
    try:
        with pytest.raises(SpecError, match=r"systems.e.experts: unknown expert 'zz'"):
            load_spec(write(tmp_path, f"experts:\n  t: {{ref: {tiny_model_dir}}}\nsystems:\n  e: {{type: echo, experts: [zz]}}\n"))
        spec = load_spec(write(tmp_path, f"experts:\n  t: {{ref: {tiny_model_dir}}}\nsystems:\n  e: {{type: echo, experts: [t]}}\n"))
        assert spec.system("e").inner == "t"
    finally:
        _REGISTRY.pop("echo")
