"""Helpers for the server tests: an app under uvicorn in a thread, `collab serve`
in a subprocess, spec files and /metrics samples."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collab.server import CollabServer

KEY = "sekret"


class Running:
    """An ASGI app under uvicorn in a thread on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Served:
    server: CollabServer
    running: Running

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def base(self) -> str:
        return self.running.base

    def client(self, key: str | None = KEY, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=kw.pop("timeout", 60), **kw)


def write_spec(path: Path, experts: dict[str, str], systems: str = "") -> Path:
    lines = ["experts:"] + [f"  {n}: {{ref: {ref}}}" for n, ref in experts.items()]
    path.write_text("\n".join(lines) + "\n" + systems)
    return path


def metric(base: str, name: str, **labels: str) -> float:
    """One sample of GET /metrics (0 when the series does not exist yet)."""
    import httpx

    want = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name + want:
            return float(value)
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`collab serve ARGS` in a subprocess on a free loopback port; its stderr goes to a file."""

    def __init__(self, *args: str, port: int | None = None, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        import os
        import subprocess
        import sys
        import tempfile

        self.port = port or free_port()
        self.log = log or Path(tempfile.mkstemp(suffix=".log")[1])
        self._stderr = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "collab.cli", "serve", *args, "--port", str(self.port)]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._stderr, stderr=subprocess.STDOUT, env=full_env)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def wait_ready(self, timeout: float = 120) -> "ServeProcess":
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collab serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"collab serve not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.log.read_text()

    def stop(self, sig: int | None = None, timeout: float = 20) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig if sig is not None else signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except Exception:  # noqa: BLE001 - a server that ignores the signal is killed
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()
        return int(self.proc.returncode)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
