"""The page's routes in-process on the fake engine: public files under a strict CSP, a self-contained page under
200 KB that writes text as text, `--no-webui`, and the key question it asks before its first call."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest

from qanat import cli
from qanat.build import build_app, build_fake_engine
from qanat.config import EngineConfig, ServerConfig
from qanat.engine.local import LocalEngine

STATIC = Path(str(files("qanat.webui") / "static"))
KEYED = ServerConfig(api_keys=("k1",))


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngine]:
    eng = build_fake_engine(EngineConfig(ctx=256, parallel=2, batch_tokens=64))
    yield eng
    eng.shutdown()


def get(engine: LocalEngine, path: str, config: ServerConfig = KEYED, **kwargs: Any) -> httpx.Response:
    app = build_app(engine, config)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            return await client.get(path, **kwargs)

    return asyncio.run(go())


def test_page_and_every_file_it_loads_are_public_under_a_strict_csp(engine: LocalEngine) -> None:
    page = get(engine, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    # Everything the HTML and the modules load, followed from the page itself.
    wanted, seen = set(re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text)), set()
    while wanted - seen:
        path = (wanted - seen).pop()
        seen.add(path)
        r = get(engine, path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == csp
        if path.endswith(".js"):
            assert r.headers["content-type"].startswith("text/javascript")
            wanted |= {f"/ui/{name}" for name in re.findall(r'from "\./([\w.-]+\.js)"', r.text)}
    assert {"/ui/main.js", "/ui/api.js", "/ui/chart.js", "/ui/style.css", "/ui/favicon.svg"} <= seen
    assert {p.name for p in STATIC.iterdir()} == {p.removeprefix("/ui/") for p in seen} | {"index.html"}


def test_page_is_self_contained_small_and_writes_text_as_text() -> None:
    sources = {p.name: p.read_text() for p in STATIC.iterdir()}
    assert sum(len(s.encode()) for s in sources.values()) < 200_000
    for name, text in sources.items():
        # No CDN, no other origin (an SVG's xmlns is a name, not a fetch).
        assert re.findall(r"https?://", text.replace('xmlns="http://www.w3.org/2000/svg"', "")) == [], name
        if name.endswith(".js"):
            # Model output and user text reach the DOM as text nodes only.
            assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function",
                                 text), name
    html = sources["index.html"]
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=", html)  # CSP would block them


def test_unknown_files_and_paths_are_404(engine: LocalEngine) -> None:
    for path in ("/ui/nope.js", "/ui/..%2Fapp.py", "/ui/index.html", "/ui/__init__.py"):
        r = get(engine, path)
        assert r.status_code == 404 and r.json()["error"]["message"], path


def test_unchanged_files_are_not_sent_again(engine: LocalEngine) -> None:
    first = get(engine, "/ui/main.js")
    again = get(engine, "/ui/main.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b"" and first.headers["cache-control"] == "no-cache"


def test_the_page_knows_before_its_first_call_whether_to_ask_for_a_key(engine: LocalEngine) -> None:
    assert get(engine, "/ui/auth").json() == {"required": True}
    assert get(engine, "/ui/auth", ServerConfig()).json() == {"required": False}
    assert get(engine, "/metrics/live").status_code == 401  # the data, unlike the page, needs the key


def test_no_webui_leaves_the_api_and_its_live_samples(engine: LocalEngine) -> None:
    off = ServerConfig(webui=False)
    for path in ("/", "/ui/main.js", "/ui/auth"):
        assert get(engine, path, off).status_code == 404, path
    assert get(engine, "/metrics/live", off).status_code == 200
    assert get(engine, "/v1/models", off).status_code == 200


def test_serve_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import qanat.serving.run

    configs: list[ServerConfig] = []
    monkeypatch.setattr(qanat.serving.run, "serve", lambda engine_config, server_config, file, *_: configs.append(
        server_config) or 0)
    assert cli.main(["serve"]) == 0 and cli.main(["serve", "--no-webui"]) == 0
    assert [c.webui for c in configs] == [True, False]
