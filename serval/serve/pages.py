"""The browser page at `/`, its static files, and `/docs` with Swagger UI served from the package.

Everything a page loads comes from `serval/serve/static/` through this router, never from a CDN,
so the page and `/docs` work on a machine with no internet. Only files that ship in that folder
can be served: the set is fixed when the module loads, so no request path reaches the disk.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from serval import vocab
from serval.serve.errors import ApiError

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {
    p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file() and p.name != "index.html"
}
SWAGGER = "swagger-ui"  # swagger-ui-dist 5.35.0 (Apache-2.0), its LICENSE and NOTICE beside it

# the file chooser offers what serval decodes
PAGE = Template((STATIC / "index.html").read_text()).substitute(
    accept=",".join(("audio/*", *vocab.AUDIO_EXTENSIONS))
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> HTMLResponse:
    """The page: choose, drop or record audio and see its emotion."""
    return HTMLResponse(PAGE, headers={"cache-control": "no-cache"})


@router.get("/static/{path:path}")
async def static(path: str) -> FileResponse:
    """A file of `serval/serve/static/`; 404 for anything else."""
    file = STATIC_FILES.get(path)
    if file is None:
        raise ApiError(404, "not_found", f"no static file {path!r}")
    return FileResponse(file, headers={"cache-control": "no-cache"})


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI for the OpenAPI document, with its script and style from this server."""
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - API",
        swagger_js_url=f"{root}/static/{SWAGGER}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/{SWAGGER}/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/favicon.svg",
        # no badge fetched from the public validator
        swagger_ui_parameters={"validatorUrl": None},
    )
