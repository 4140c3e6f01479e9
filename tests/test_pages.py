"""The page at `/`, its static files and `/docs`: everything served by serval itself, no CDN.

The page's behaviour in a browser is tests/test_browser.py's; these check what the server sends.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from serval import vocab  # noqa: E402
from serval.checkpoint import save_model  # noqa: E402
from serval.inference import load  # noqa: E402
from serval.model import SERConfig, SERModel  # noqa: E402
from serval.serve.app import create_app  # noqa: E402
from serval.serve.pages import STATIC  # noqa: E402

REFS = re.compile(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    torch.manual_seed(0)
    model = save_model(SERModel(SERConfig.tiny()), tmp_path_factory.mktemp("model") / "tiny")
    return create_app(load(model, device="cpu"))


def refs(html: str) -> list[str]:
    return [a or b for a, b in REFS.findall(html)]


def test_docs_serve_swagger_ui_from_this_server(app):
    with TestClient(app) as c:
        r = c.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = refs(r.text)
        assert "/static/swagger-ui/swagger-ui-bundle.js" in urls and "/openapi.json" in urls, urls
        assert "://" not in r.text  # no absolute URL at all: no CDN, no favicon from elsewhere
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), url
            got = c.get(url)
            assert got.status_code == 200, url
        js = c.get("/static/swagger-ui/swagger-ui-bundle.js")
        assert "javascript" in js.headers["content-type"] and "SwaggerUIBundle" in js.text
        assert c.get("/static/swagger-ui/swagger-ui.css").headers["content-type"].startswith("text/css")
        assert (STATIC / "swagger-ui" / "LICENSE").read_text().lstrip().startswith("Apache License")
        # FastAPI's own CDN pages are gone, and the page is not an API operation
        assert c.get("/redoc").status_code == 404
        paths = c.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)
        assert "/v1/emotion" in paths


def test_docs_follow_the_root_path(app):
    with TestClient(app, root_path="/serval") as c:
        urls = refs(c.get("/docs").text)
    assert "/serval/static/swagger-ui/swagger-ui.css" in urls and "/serval/openapi.json" in urls, urls


def test_page_and_its_assets(app):
    with TestClient(app) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert 'data-testid="label"' in page and ">Record</button>" in page
        accept = re.search(r'<input type="file"[^>]* accept="([^"]+)"', page).group(1).split(",")
        assert accept == ["audio/*", *vocab.AUDIO_EXTENSIONS]
        urls = refs(page)
        assert {"static/app.js", "static/style.css", "static/favicon.svg", "docs"} <= set(urls), urls
        for url in urls:
            assert c.get("/" + url).status_code == 200, url
        worklet = c.get("/static/recorder.js")
        assert "javascript" in worklet.headers["content-type"] and "registerProcessor" in worklet.text
        app_js = c.get("/static/app.js").text
        assert "static/recorder.js" in app_js and "v1/stream" in app_js and "MediaRecorder" not in app_js
        # nothing the page runs or styles itself with names another host
        for text in (page, app_js, worklet.text, c.get("/static/style.css").text):
            assert "://" not in text


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/../pages.py", "/static/%2e%2e/pages.py", "/static/index.html"]
)
def test_static_serves_only_its_own_files(app, path):
    with TestClient(app) as c:
        r = c.get(path)
    assert r.status_code == 404, path
    assert set(r.json()) == {"error"}
