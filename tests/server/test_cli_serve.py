"""`collab serve` as a user runs it: a process on loopback, /health while loading,
the key from --api-key or COLLAB_API_KEY, one log line per request, a clean stop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.helpers import ServeProcess, write_spec


def test_help_lists_serve_without_importing_the_server() -> None:
    code = "import sys, collab.cli; collab.cli.app(['--help'], standalone_mode=False); print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and out.stdout.strip().endswith("[]")


def test_serve_a_spec_with_a_key_from_the_environment(tmp_path: Path, tiny_model_dir: Path, tiny_plain_model_dir: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", {"tiny": str(tiny_model_dir), "plain": str(tiny_plain_model_dir)})
    with ServeProcess(str(spec), "--max-batch", "4", env={"COLLAB_API_KEY": "k1"}) as srv:
        srv.wait_ready()
        health = httpx.get(srv.base + "/health").json()
        assert health == {"status": "ready", "models": ["tiny", "plain"], "loaded": 2}
        client = openai.OpenAI(base_url=srv.url, api_key="k1", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.model_extra["collab"]["expert"] == "plain"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="k2", max_retries=0).models.list()
        list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True))
        code = srv.stop()
        log = srv.output()
    assert code == 130 and log.rstrip().endswith("interrupted"), log  # Ctrl-C, as every collab command
    lines = [line for line in log.splitlines() if "/v1/" in line]
    assert len(lines) == 3, log  # one line per request
    assert re.search(r"POST /v1/chat/completions status=200 model=plain stream=false tokens=\d+\+\d+ latency=[0-9.]+s queue=[0-9.]+s expert=plain", lines[0]), lines[0]
    assert re.search(r"GET /v1/models status=401 .*error=\"wrong API key", lines[1]), lines[1]
    assert "status=200 model=tiny stream=true tokens=" in lines[2]
    assert "ready: tiny, plain on http://127.0.0.1" in log and "(key required)" in log


def test_serve_one_model_reference_with_api_key_option(tiny_model_dir: Path) -> None:
    with ServeProcess(str(tiny_model_dir), "--api-key", "k") as srv:
        srv.wait_ready()
        models = httpx.get(srv.url + "/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == [tiny_model_dir.name]


def test_a_model_that_fails_to_load_stops_the_server_with_its_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"experts:\n  x: {{ref: {broken}}}\n")
    with ServeProcess(str(spec)) as srv:
        code = srv.proc.wait(60)
    assert code == 1
    assert "error: " in srv.output() and "model.safetensors: not a readable safetensors file" in srv.output()


def test_a_bad_spec_fails_before_listening(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("experts:\n  x: {ref: does-not-exist}\n")
    out = subprocess.run([sys.executable, "-m", "collab.cli", "serve", str(spec)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "experts.x.ref: 'does-not-exist' not found" in out.stderr
