"""The playground page in a real headless browser: Debian's chromium driven by
Playwright through the system executable (nothing downloads a browser build)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from collab.server import CollabServer, ServeOptions, create_app
from tests.server.helpers import Running, write_spec

pytestmark = pytest.mark.slow

KEY = "play-key"


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (apt-get install chromium); the playground test needs it")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def test_the_page_is_served_without_a_key(tiny_expert: Any) -> None:
    server = CollabServer.from_systems({"tiny": tiny_expert}, ServeOptions(api_key=KEY))
    server.load()
    with Running(create_app(server)) as run:
        r = httpx.get(run.base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>collab playground</title>" in r.text and "/v1/chat/completions" in r.text


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_plain_model_dir: Path) -> Iterator[Running]:
    from collab.spec import load_spec
    from routers.baselines import constant_router

    root = tmp_path_factory.mktemp("play")
    constant_router(["a", "b"], [0.9, 0.35]).save(root / "router")
    spec = write_spec(root / "s.yaml", {"a": str(tiny_model_dir), "b": str(tiny_plain_model_dir)}, "systems:\n  auto: {type: route, router: router, experts: [a, b]}\n")
    server = CollabServer.from_spec(load_spec(spec), ServeOptions(api_key=KEY))
    server.load()
    with Running(create_app(server)) as run:
        yield run
    server.close()


@pytest.fixture
def page(site: Running) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    exe = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1200, "height": 800})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(site.base + "/")
        yield pg
        browser.close()
        assert not errors, errors


def _ask(page: Any, model: str, text: str, max_tokens: int = 12) -> None:
    page.select_option("#model", model)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("document.getElementById('status').textContent === 'done' || document.getElementById('status').textContent === 'error'", timeout=30000)


def test_chat_with_a_routed_system_and_see_who_answered(page: Any, site: Running, tmp_path: Path) -> None:
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length === 3", timeout=15000)
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["a", "b", "auto"]
    _ask(page, "auto", "What is 2 + 2?")
    expected = httpx.post(site.url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 12, "temperature": 0}).json()
    answer = page.locator(".msg.assistant").last
    assert answer.locator(".text").text_content() == expected["choices"][0]["message"]["content"]
    assert answer.locator(".who").inner_text() == "auto \u2192 a"
    assert page.inner_text("#trace-expert") == "a" and page.inner_text("#trace-type") == "route"
    rows = page.eval_on_selector_all("#trace-scores tr", "rs => rs.map(r => [r.className, r.cells[0].textContent, r.cells[1].textContent])")
    assert rows == [["chosen", "a", "0.900"], ["", "b", "0.350"]]
    assert "a at 0.900" in page.inner_text("#trace-reason")
    page.screenshot(path=str(tmp_path / "playground.png"))
    # a second turn to the plain expert; clicking the first answer shows its trace again
    _ask(page, "b", "And 3 + 3?")
    assert page.inner_text("#trace-expert") == "b" and page.is_hidden("#trace-scores-box")
    page.locator(".msg.assistant").first.click()
    assert page.inner_text("#trace-expert") == "a"


def test_errors_show_in_the_page(page: Any) -> None:
    page.fill("#key", "wrong")
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('status').textContent.includes('wrong API key')", timeout=15000)
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length === 3", timeout=15000)
    _ask(page, "a", "word " * 400)
    assert page.locator(".msg.error .text").last.inner_text().startswith("413: prompt has")
